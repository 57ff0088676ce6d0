"""tpmoe.fused_experts on the CPU path: half precision against the loop-style reference, empty
sizes, and the backends the call dispatches to. (fp32 and float64, output and every gradient on
every case: tests/ops/test_experts_contract.py.)

Each half-precision test runs both CPU paths: the native ops of tpmoe._C where they are built,
and the plain-PyTorch twin (tpmoe.cpu.grouped_experts_torch) that runs where they are not.
"""
import pytest
import torch

import tpmoe
from tpmoe._native import native_available
from tpmoe.reference import reference_experts

from support.experts_cases import cast, make_inputs, run_with_grads
from support.tolerances import assert_fp32_close, assert_within_twice_same_dtype

CPU_PATHS = [pytest.param("native", marks=pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")),
             "torch_fallback"]


@pytest.fixture
def cpu_path(request, monkeypatch):
    """tpmoe.fused_experts(backend="cpu") on the path named by the test's `path` parameter."""
    if request.node.callspec.params["path"] == "torch_fallback":
        monkeypatch.setenv("TPMOE_SKIP_NATIVE", "1")
    return lambda *args, **kwargs: tpmoe.fused_experts(*args, backend="cpu", **kwargs)


@pytest.mark.filterwarnings("ignore::tpmoe._native.NativeFallbackWarning")
@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,activation,gated", [("concatenated", "silu", True),
                                                     ("gpt_oss", "clamped_swiglu", True),
                                                     ("interleaved", "clamped_silu", True),
                                                     ("concatenated", "silu_clamped", True),
                                                     ("gpt_oss", "softcapped_swiglu", True),
                                                     ("concatenated", "relu2", False)])
def test_cpu_path_half_precision_within_twice_torch_error(dtype, layout, activation, gated, path, cpu_path, seed):
    inputs, grad_out = make_inputs(seed, 29, 32, 24, 6, 2, layout=layout, gated=gated, bias=True)
    options = dict(activation=activation, layout=layout, gated=gated)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out)
    torch_out, torch_grads = run_with_grads(reference_experts, inputs, options, grad_out, dtype)
    out, grads = run_with_grads(cpu_path, inputs, options, grad_out, dtype)
    assert out.dtype == dtype
    assert_within_twice_same_dtype(out, torch_out, ref_out, "output")
    for name, grad in ref_grads.items():
        assert_within_twice_same_dtype(grads[name], torch_grads[name], grad, f"d{name}")


def test_empty_shard_gives_weighted_down_bias_only(seed):
    # A TP rank whose intermediate shard is empty (I_p = 0) contributes only what the bias adds.
    inputs, grad_out = make_inputs(seed, 5, 8, 0, 3, 2, layout="concatenated", gated=True, bias=True)
    options = dict(activation="silu", layout="concatenated", gated=True)
    out, grads = run_with_grads(lambda *a, **k: tpmoe.fused_experts(*a, backend="cpu", **k), inputs, options,
                                grad_out)
    ids, weights, b_down = inputs["topk_ids"], inputs["topk_weights"], inputs["b_down"]
    expected = (weights[..., None] * b_down[ids]).sum(dim=1)
    assert_fp32_close(out, expected, "output", rtol=1e-12)
    assert grads["hidden_states"].abs().max() == 0


def test_zero_tokens_returns_empty():
    out = tpmoe.fused_experts(torch.randn(0, 8), torch.randn(3, 12, 8), torch.randn(3, 8, 6),
                              torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), backend="cpu")
    assert out.shape == (0, 8)


def test_auto_backend_on_cpu_equals_cpu_backend_bitwise(seed):
    inputs, _ = make_inputs(seed, 19, 16, 12, 5, 2, layout="interleaved", gated=True, bias=True)
    inputs = cast(inputs, torch.float32)
    args = (inputs["hidden_states"], inputs["w_gate_up"], inputs["w_down"], inputs["topk_ids"],
            inputs["topk_weights"])
    kwargs = dict(layout="interleaved", b_gate_up=inputs["b_gate_up"], b_down=inputs["b_down"])
    auto = tpmoe.fused_experts(*args, **kwargs)
    cpu = tpmoe.fused_experts(*args, backend="cpu", **kwargs)
    again = tpmoe.fused_experts(*args, backend="cpu", **kwargs)
    assert torch.equal(auto, cpu) and torch.equal(cpu, again)


def test_reference_backend_is_the_reference(seed):
    inputs, _ = make_inputs(seed, 7, 8, 6, 4, 2, layout="concatenated", gated=True, bias=False)
    args = (inputs["hidden_states"], inputs["w_gate_up"], inputs["w_down"], inputs["topk_ids"],
            inputs["topk_weights"])
    assert torch.equal(tpmoe.fused_experts(*args, backend="reference"), reference_experts(*args))
