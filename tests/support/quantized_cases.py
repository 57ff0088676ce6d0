"""The quantized-experts cases (tpmoe.fp8's "fp8_block", tpmoe.mxfp4's "mxfp4") shared by their
tests and the kernel check that runs in a process of its own: problems, and the float64
reference run on the dequantized weights."""
import torch

from tpmoe import ExpertSpec, routed_experts
from tpmoe.fp8 import quantize_fp8_experts
from tpmoe.mxfp4 import quantize_mxfp4_experts
from tpmoe.quantized import dequantize_experts
from tpmoe.reference import reference_experts

from .experts_cases import input_scale, make_expert_weights, make_routing
from .tolerances import assert_fp32_close, assert_within_twice_same_dtype

# fp8: (T, H, I, E, K, layout, gated, activation, bias, routing mode, block size): both packings,
# gated and not, the gated-only activations, T = 1 and primes, an expert with no tokens
# ("skip_last"), every token on one expert; sizes that B does not divide (last partial blocks).
FP8_CASES = [
    (13, 16, 24, 5, 2, "concatenated", True, "silu", False, "skip_last", 8),
    (1, 24, 20, 4, 2, "interleaved", True, "gelu", True, "random", 8),
    (7, 20, 12, 3, 3, "concatenated", False, "relu2", True, "one_expert", 8),
    (11, 16, 16, 4, 2, "interleaved", True, "clamped_swiglu", False, "random", 4),
    (17, 12, 18, 6, 1, "interleaved", False, "gelu_tanh", False, "skip_last", 8),
    (5, 16, 8, 3, 2, "concatenated", True, "softcapped_swiglu", True, "random", 16),
]

# mxfp4: (T, H, I, E, K, layout, gated, activation, alpha, limit, bias, routing mode): GPT-OSS's
# clamped swiglu (its alpha and limit, and a tighter limit), the other packings and activations,
# T = 1 and primes, an expert with no tokens, every token on one expert; H and I no multiples of 32.
MXFP4_CASES = [
    (13, 70, 40, 5, 2, "interleaved", True, "clamped_swiglu", 1.702, 7.0, True, "skip_last"),
    (1, 64, 45, 4, 2, "interleaved", True, "clamped_swiglu", 1.702, 3.0, True, "random"),
    (7, 48, 33, 3, 3, "concatenated", True, "silu", 1.702, 7.0, False, "one_expert"),
    (11, 40, 20, 4, 2, "interleaved", False, "gelu", 1.702, 7.0, True, "random"),
]

# Prefill: past the kernels' limits on rows an expert (fp8: 272..291, past the AMX kernel's
# kRowsFp8 = 256 in csrc/experts_cpu_quantized_amx.h; MXFP4: ~27, past kFusedRowsMxfp4 = 8 in
# csrc/experts_cpu_quantized_kernels.h), so the native op widens the weight rows and multiplies
# them with the widened GEMM's float32 kernel; H and I no multiples of that kernel's k padding
# (16) or of the scale blocks.
FP8_PREFILL_CASE = (420, 40, 24, 3, 2, "concatenated", True, "silu", True, "random", 16)
MXFP4_PREFILL_CASE = (40, 70, 45, 3, 2, "interleaved", True, "clamped_swiglu", 1.702, 7.0, True, "random")


def case_id(case):
    return "-".join(map(str, case))


def fp8_problem(case, seed):
    """(full fp8 ExpertWeights, spec, x float64, topk_ids, topk_weights float64)."""
    num_tokens, hidden, inter, experts, top_k, layout, gated, activation, bias, mode, block = case
    generator = torch.Generator().manual_seed(seed)
    dense = make_expert_weights(experts, hidden, inter, layout=layout, gated=gated, bias=bias, generator=generator)
    weights = quantize_fp8_experts(dense["w_gate_up"], dense["w_down"], layout=layout, gated=gated, block_size=block,
                                   b_gate_up=dense.get("b_gate_up"), b_down=dense.get("b_down"))
    topk_ids, topk_weights = make_routing(num_tokens, experts, top_k, mode=mode, generator=generator)
    x = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64) * input_scale(activation)
    return weights, ExpertSpec(activation=activation, layout=layout, gated=gated), x, topk_ids, topk_weights.double()


def mxfp4_problem(case, seed):
    """(full mxfp4 ExpertWeights, spec, x float64, topk_ids, topk_weights float64)."""
    num_tokens, hidden, inter, experts, top_k, layout, gated, activation, alpha, limit, bias, mode = case
    generator = torch.Generator().manual_seed(seed)
    dense = make_expert_weights(experts, hidden, inter, layout=layout, gated=gated, bias=bias, generator=generator)
    weights = quantize_mxfp4_experts(dense["w_gate_up"], dense["w_down"], layout=layout, gated=gated,
                                     b_gate_up=dense.get("b_gate_up"), b_down=dense.get("b_down"))
    topk_ids, topk_weights = make_routing(num_tokens, experts, top_k, mode=mode, generator=generator)
    x = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64) * input_scale(activation)
    spec = ExpertSpec(activation=activation, layout=layout, gated=gated, alpha=alpha, limit=limit)
    return weights, spec, x, topk_ids, topk_weights.double()


def with_dtype(weights, dtype):
    """The quantized weights with their biases in dtype, requiring grad (the stored values and
    scales keep theirs)."""
    cast = [None if b is None else b.to(dtype).requires_grad_(True) for b in (weights.b_gate_up, weights.b_down)]
    return weights._replace(b_gate_up=cast[0], b_down=cast[1])


def reference_on_dequantized(weights, spec, x, topk_ids, topk_weights, dtype=torch.float64):
    """The loop-style reference on the dequantized weights, in dtype."""
    dense = dequantize_experts(weights, spec, dtype)
    return reference_experts(x, dense.w_gate_up, dense.w_down, topk_ids, topk_weights, b_gate_up=dense.b_gate_up,
                             b_down=dense.b_down, **spec.keywords())


def assert_float32_matches_reference(weights, spec, x, topk_ids, topk_weights, backend="auto"):
    """routed_experts on quantized `weights` in float32 against the float64 reference on their
    dequantized values: the output and the gradients of x, the routing weights and the biases
    (the quantized weights are frozen)."""
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    ours, reference = with_dtype(weights, torch.float32), with_dtype(weights, torch.float64)
    x32, w32 = x.float().requires_grad_(True), topk_weights.float().requires_grad_(True)
    out = routed_experts(x32, ours, topk_ids, w32, spec, backend=backend)
    out.backward(grad_out.float())
    x64, w64 = x.clone().requires_grad_(True), topk_weights.clone().requires_grad_(True)
    expected = reference_on_dequantized(reference, spec, x64, topk_ids, w64)
    expected.backward(grad_out)
    assert_fp32_close(out.detach(), expected.detach())
    assert_fp32_close(x32.grad, x64.grad, name="dx")
    assert_fp32_close(w32.grad, w64.grad, name="dtopk_weights")
    for name in ("b_gate_up", "b_down"):
        if getattr(ours, name) is not None:
            assert_fp32_close(getattr(ours, name).grad, getattr(reference, name).grad, name=f"d{name}")


def assert_bf16_within_the_bf16_rule(weights, spec, x, topk_ids, topk_weights, backend="auto"):
    """routed_experts in bf16 within twice the error of the loop-style reference run in bf16 on
    the bf16-dequantized weights (the same-dtype PyTorch run), both against float64."""
    with torch.no_grad():
        ours = routed_experts(x.bfloat16(), with_dtype(weights, torch.bfloat16), topk_ids, topk_weights.float(), spec,
                              backend=backend)
        same_dtype = reference_on_dequantized(with_dtype(weights, torch.bfloat16), spec, x.bfloat16(), topk_ids,
                                              topk_weights.float(), dtype=torch.bfloat16)
        expected = reference_on_dequantized(with_dtype(weights, torch.float64), spec, x, topk_ids, topk_weights)
    assert_within_twice_same_dtype(ours, same_dtype, expected)


def assert_native_matches_reference(weights, spec, x, topk_ids, topk_weights, shard):
    """The native op alone (tpmoe.cpu.quantized, no gradient wanted) against the float64
    reference on the dequantized weights, on the whole experts and on TP rank 1 of 3 (whose first
    intermediate value sits inside a scale block in most cases). The caller makes the plain path
    fail first, so that a silent fallback cannot pass."""
    import tpmoe.cpu.quantized as native
    from tpmoe._native import native_ops
    native_ops()  # the native op's check: it fails where tpmoe._C is not built
    for which, experts in (("full", weights), ("shard 1 of 3", shard(weights, layout=spec.layout, gated=spec.gated,
                                                                    rank=1, world_size=3))):
        with torch.no_grad():
            out = native.experts_cpu_quantized(x.float(), with_dtype(experts, torch.float32), topk_ids,
                                               topk_weights.float(), spec)
        expected = reference_on_dequantized(with_dtype(experts, torch.float64), spec, x, topk_ids, topk_weights)
        assert_fp32_close(out, expected.detach(), name=which)
