"""Bad input to tpmoe.fused_experts: a Python exception naming the argument, expected and got."""
import pytest
import torch

import tpmoe


def valid_args(T=5, H=8, I=6, E=4, K=2):
    return dict(hidden_states=torch.randn(T, H), w_gate_up=torch.randn(E, 2 * I, H), w_down=torch.randn(E, H, I),
                topk_ids=torch.stack([torch.randperm(E)[:K] for _ in range(T)]), topk_weights=torch.rand(T, K))


def call(**overrides):
    args = valid_args()
    options = {name: overrides.pop(name) for name in list(overrides)
               if name in ("activation", "layout", "gated", "b_gate_up", "b_down", "backend")}
    args.update(overrides)
    return tpmoe.fused_experts(args.pop("hidden_states"), args.pop("w_gate_up"), args.pop("w_down"),
                               args.pop("topk_ids"), args.pop("topk_weights"), **options)


def test_valid_args_run():
    assert call().shape == (5, 8)


@pytest.mark.parametrize("overrides,exception,pieces", [
    (dict(topk_ids=torch.rand(5, 2)), TypeError, ["topk_ids", "int32, int64", "float32"]),
    (dict(topk_ids=torch.full((5, 2), 4)), ValueError, ["topk_ids", "[0, 4)", "4"]),
    (dict(topk_ids=torch.full((5, 2), -1)), ValueError, ["topk_ids", "[0, 4)", "-1"]),
    (dict(topk_ids=torch.zeros(5, 5, dtype=torch.long), topk_weights=torch.rand(5, 5)), ValueError,
     ["topk_ids", "K <= E (4)", "K = 5"]),
    (dict(topk_ids=torch.zeros(4, 2, dtype=torch.long)), ValueError, ["topk_ids", "5 rows", "(4, 2)"]),
    (dict(topk_weights=torch.rand(5, 3)), ValueError, ["topk_weights", "(5, 2)", "(5, 3)"]),
    (dict(hidden_states=torch.randn(5, 8, 1)), ValueError, ["hidden_states", "2-D", "(5, 8, 1)"]),
    (dict(hidden_states=torch.randint(0, 3, (5, 8))), TypeError, ["hidden_states", "int64"]),
    (dict(w_gate_up=torch.randn(4, 12, 9)), ValueError, ["w_gate_up", "hidden size 8", "(4, 12, 9)"]),
    (dict(w_gate_up=torch.randn(4, 11, 8)), ValueError, ["w_gate_up", "even", "(4, 11, 8)"]),
    (dict(w_down=torch.randn(4, 8, 5)), ValueError, ["w_down", "(4, 8, 6)", "(4, 8, 5)"]),
    (dict(w_down=torch.randn(4, 8, 6, dtype=torch.float64)), TypeError, ["w_down", "float32", "float64"]),
    (dict(w_down=torch.randn(4, 8, 6, device="meta")), ValueError, ["w_down", "cpu", "meta"]),
    (dict(b_gate_up=torch.randn(4, 6)), ValueError, ["b_gate_up", "(4, 12)", "(4, 6)"]),
    (dict(b_down=torch.randn(3, 8)), ValueError, ["b_down", "(4, 8)", "(3, 8)"]),
    (dict(layout="gpt_oss"), ValueError, ["w_gate_up", "layout 'gpt_oss'"]),
    (dict(activation="swish"), ValueError, ["activation", "swish"]),
    (dict(layout="packed"), ValueError, ["layout", "packed"]),
    (dict(backend="cuda"), ValueError, ["backend", "cuda"]),
    (dict(activation="clamped_swiglu", gated=False), ValueError, ["gated", "clamped_swiglu"]),
    (dict(activation="clamped_silu", gated=False), ValueError, ["gated", "clamped_silu"]),
    (dict(activation="silu_clamped", gated=False), ValueError, ["gated", "silu_clamped"]),
    (dict(activation="softcapped_swiglu", gated=False), ValueError, ["gated", "softcapped_swiglu"]),
    (dict(hidden_states=[[1.0]]), TypeError, ["hidden_states", "torch.Tensor", "list"]),
])
def test_bad_input_names_argument_expected_and_got(overrides, exception, pieces):
    with pytest.raises(exception) as info:
        call(**overrides)
    message = str(info.value)
    for piece in pieces:
        assert piece in message, f"{piece!r} not in {message!r}"


def test_triton_backend_on_cpu_without_interpreter_says_so(monkeypatch):
    # The interpreter flag is read when kernels are defined: a fresh process shows the message.
    import subprocess
    import sys
    code = ("import torch, tpmoe\n"
            "try:\n"
            "    tpmoe.fused_experts(torch.randn(3, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4),\n"
            "                        torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), backend='triton')\n"
            "except RuntimeError as error:\n"
            "    print('ERROR:', error)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr
