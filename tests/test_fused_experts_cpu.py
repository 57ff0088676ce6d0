"""tpmoe.fused_experts on the CPU path against the loop-style reference: output and every gradient.

Each test runs both CPU paths: the native ops of tpmoe._C where they are built, and the grouped
PyTorch fallback (tpmoe.experts_cpu.grouped_experts_torch) that runs where they are not.
"""
import pytest
import torch

import tpmoe
import tpmoe.experts_cpu
from tpmoe.config import GATED_ONLY_ACTIVATIONS
from tpmoe.cpu import cpu_ops_available
from tpmoe.reference import reference_experts

from experts_cases import make_expert_weights, make_routing
from tolerances import assert_fp32_close, assert_within_twice_same_dtype

GRAD_NAMES = ("hidden_states", "w_gate_up", "w_down", "topk_weights", "b_gate_up", "b_down")
CPU_PATHS = [pytest.param("native", marks=pytest.mark.skipif(not cpu_ops_available(), reason="tpmoe._C is not built")),
             "torch_fallback"]


@pytest.fixture
def cpu_path(request, monkeypatch):
    """tpmoe.fused_experts(backend="cpu") on the path named by the test's `path` parameter."""
    if request.node.callspec.params["path"] == "torch_fallback":
        monkeypatch.setattr(tpmoe.experts_cpu, "cpu_ops_available", lambda: False)
    return lambda *args, **kwargs: tpmoe.fused_experts(*args, backend="cpu", **kwargs)


def run_with_grads(fn, inputs, options, grad_out):
    leaves = {name: value.detach().clone().requires_grad_(True) for name, value in inputs.items()
              if name != "topk_ids"}
    out = fn(leaves["hidden_states"], leaves["w_gate_up"], leaves["w_down"], inputs["topk_ids"],
             leaves["topk_weights"], b_gate_up=leaves.get("b_gate_up"), b_down=leaves.get("b_down"), **options)
    out.backward(grad_out.to(out.dtype))
    grads = {name: leaves[name].grad for name in GRAD_NAMES if name in leaves}
    return out.detach(), grads


def make_inputs(seed, num_tokens, hidden_size, intermediate_local, num_experts, top_k, *, layout, gated, bias,
                mode="random"):
    generator = torch.Generator().manual_seed(seed)
    topk_ids, topk_weights = make_routing(num_tokens, num_experts, top_k, mode=mode, generator=generator)
    inputs = make_expert_weights(num_experts, hidden_size, intermediate_local, layout=layout, gated=gated,
                                 bias=bias, generator=generator)
    inputs["hidden_states"] = torch.randn(num_tokens, hidden_size, generator=generator, dtype=torch.float64)
    inputs["topk_ids"] = topk_ids
    inputs["topk_weights"] = topk_weights.double()
    grad_out = torch.randn(num_tokens, hidden_size, generator=generator, dtype=torch.float64)
    return inputs, grad_out


def cast(inputs, dtype):
    # Routing weights stay float32 at half precision, as tpmoe.route returns them.
    weight_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return {name: (value if name == "topk_ids" else value.to(weight_dtype if name == "topk_weights" else dtype))
            for name, value in inputs.items()}


CASES = [
    # (T, H, I_p, E, K, layout, gated, activation, bias, mode)
    (37, 24, 40, 7, 2, "concatenated", True, "silu", False, "skip_last"),
    (1, 16, 12, 5, 3, "concatenated", True, "gelu", True, "random"),
    (13, 20, 9, 6, 2, "interleaved", True, "gelu_tanh", True, "one_expert"),
    (11, 24, 10, 4, 2, "gpt_oss", True, "clamped_swiglu", True, "random"),
    (17, 16, 8, 5, 5, "concatenated", False, "relu", True, "random"),
    (9, 12, 7, 3, 1, "interleaved", True, "relu", False, "random"),
    (8, 16, 6, 4, 2, "gpt_oss", False, "gelu", False, "skip_last"),
    (12, 20, 11, 4, 2, "interleaved", True, "clamped_swiglu", True, "random"),
    (15, 24, 10, 5, 2, "concatenated", True, "clamped_silu", True, "skip_last"),
    (13, 20, 9, 4, 3, "gpt_oss", True, "clamped_silu", False, "random"),
    (11, 16, 12, 4, 2, "interleaved", True, "silu_clamped", True, "one_expert"),
    (10, 16, 8, 3, 2, "concatenated", True, "softcapped_swiglu", False, "random"),
    (14, 20, 10, 4, 2, "gpt_oss", True, "softcapped_swiglu", True, "random"),
    (16, 12, 8, 4, 2, "interleaved", False, "relu2", True, "random"),
]


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cpu_path_matches_reference_fp32_and_fp64(case, path, cpu_path, seed):
    num_tokens, hidden, inter, experts, top_k, layout, gated, activation, bias, mode = case
    inputs, grad_out = make_inputs(seed, num_tokens, hidden, inter, experts, top_k, layout=layout, gated=gated,
                                   bias=bias, mode=mode)
    if activation in GATED_ONLY_ACTIVATIONS:
        # Push some pre-activations past the clamps (deep into the softcaps) so that both
        # branches of each are exercised.
        inputs["hidden_states"] = inputs["hidden_states"] * 20
    options = dict(activation=activation, layout=layout, gated=gated, alpha=1.702, limit=7.0)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out)
    # float64: the two paths differ only in summation order.
    out64, grads64 = run_with_grads(cpu_path, inputs, options, grad_out)
    assert_fp32_close(out64, ref_out, "output fp64", rtol=1e-12)
    for name, grad in ref_grads.items():
        assert_fp32_close(grads64[name], grad, f"d{name} fp64", rtol=1e-12)
    out32, grads32 = run_with_grads(cpu_path, cast(inputs, torch.float32), options, grad_out)
    assert out32.dtype == torch.float32
    assert_fp32_close(out32, ref_out, "output fp32")
    for name, grad in ref_grads.items():
        assert_fp32_close(grads32[name], grad, f"d{name} fp32")


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
    half_inputs = cast(inputs, dtype)
    torch_out, torch_grads = run_with_grads(reference_experts, half_inputs, options, grad_out)
    out, grads = run_with_grads(cpu_path, half_inputs, options, grad_out)
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
