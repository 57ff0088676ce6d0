"""Block-scaled fp8 experts (tpmoe.fp8, format "fp8_block"): the format, TP / EP shards at any
size, and tpmoe.routed_experts on them against the float64 reference run on the dequantized
weights (output, and the gradients of everything but the frozen fp8 weights)."""
import os
import subprocess
import sys

import pytest
import torch

from tpmoe import ExpertSpec, ExpertWeights, routed_experts
from tpmoe.fp8 import (FP8_DTYPE, BlockScales, dequantize_fp8_experts, quantize_fp8_experts,
                       shard_fp8_experts)

from support.experts_cases import make_expert_weights, make_routing
from support.quantized_cases import (FP8_CASES, FP8_PREFILL_CASE, MXFP4_PREFILL_CASE, assert_bf16_within_the_bf16_rule,
                                     assert_float32_matches_reference, assert_native_matches_reference, case_id,
                                     fp8_problem, mxfp4_problem, reference_on_dequantized, with_dtype)
from support.tolerances import FP32_RTOL, assert_fp32_close

CASES = FP8_CASES
_case_id, _problem, _with_dtype, _reference = case_id, fp8_problem, with_dtype, reference_on_dequantized


def test_quantize_round_trip_is_within_e4m3_rounding(seed):
    generator = torch.Generator().manual_seed(seed)
    dense = make_expert_weights(3, 20, 12, generator=generator)
    weights = quantize_fp8_experts(dense["w_gate_up"], dense["w_down"], block_size=8)
    assert weights.format == "fp8_block" and weights.w_gate_up.dtype == FP8_DTYPE
    assert tuple(weights.scales.gate_up.shape) == (3, 2, 2, 3) and tuple(weights.scales.down.shape) == (3, 3, 2)
    back = dequantize_fp8_experts(weights, layout="concatenated", gated=True, dtype=torch.float64)

    def per_element(scales, rows, cols):  # each element's block scale, [..., rows, cols]
        return scales.double().repeat_interleave(8, -2)[..., :rows, :].repeat_interleave(8, -1)[..., :cols]
    block_scales = {"w_gate_up": per_element(weights.scales.gate_up, 12, 20).reshape(3, 24, 20),
                    "w_down": per_element(weights.scales.down, 20, 12)}
    for name, full in (("w_gate_up", dense["w_gate_up"]), ("w_down", dense["w_down"])):
        error = (getattr(back, name) - full).abs()
        scale = block_scales[name]
        # e4m3 after dividing by the block's scale (amax / 448: no value clips): 3 mantissa bits,
        # so half a step is 2^-4 relative for normal values, and 2^-10 absolute among the
        # subnormals (spacing 2^-9); both back at the block's scale. The scale's own float32
        # rounding adds at most 2^-24 relative.
        bound = full.abs() * (2.0 ** -4 + 2.0 ** -23) + 2.0 ** -10 * scale
        assert (error <= bound).all(), f"{name}: dequantized values off by more than e4m3's rounding"
        assert (full.abs() <= 448 * scale * (1 + 2.0 ** -23)).all(), f"{name}: a block's scale clips its values"
        assert error.max() > 0, f"{name}: quantization changed nothing (the test would be vacuous)"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fp8_experts_float32_match_reference_on_dequantized_weights(case, seed):
    assert_float32_matches_reference(*_problem(case, seed))


@pytest.mark.parametrize("case", CASES[:3], ids=_case_id)
def test_fp8_experts_bf16_within_twice_a_bf16_torch_run(case, seed):
    assert_bf16_within_the_bf16_rule(*_problem(case, seed))


@pytest.mark.parametrize("world_size, inter, block", [(2, 20, 8), (3, 20, 8), (3, 10 * 128 + 40, 128), (4, 6, 4)])
def test_tp_shards_at_any_size_hold_exactly_their_columns(world_size, inter, block, seed):
    """Shards of I over P by torch.chunk's rule (I = 1320 over 3: 440 each, not a multiple of
    128; I = 6 over 4: 2, 2, 2, 0): each dequantizes to exactly its columns of the full weights,
    and the ranks' partial outputs sum to the full block's."""
    hidden, experts, top_k, num_tokens = 16, 3, 2, 7
    generator = torch.Generator().manual_seed(seed)
    for layout, gated in (("concatenated", True), ("interleaved", True), ("concatenated", False)):
        dense = make_expert_weights(experts, hidden, inter, layout=layout, gated=gated, generator=generator)
        full = quantize_fp8_experts(dense["w_gate_up"], dense["w_down"], layout=layout, gated=gated, block_size=block)
        full_dense = dequantize_fp8_experts(full, layout=layout, gated=gated, dtype=torch.float64)
        spec = ExpertSpec(layout=layout, gated=gated)
        topk_ids, topk_weights = make_routing(num_tokens, experts, top_k, generator=generator)
        x = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64)
        total = torch.zeros(num_tokens, hidden, dtype=torch.float64)
        start = 0
        for rank in range(world_size):
            shard = shard_fp8_experts(full, layout=layout, gated=gated, rank=rank, world_size=world_size)
            local = dequantize_fp8_experts(shard, layout=layout, gated=gated, dtype=torch.float64)
            stop = start + shard.w_down.shape[2]
            assert shard.scales.block_offset == (start % block if stop > start else 0)
            assert torch.equal(local.w_down, full_dense.w_down[:, :, start:stop])
            if gated and layout == "concatenated":
                columns = torch.cat([full_dense.w_gate_up[:, start:stop], full_dense.w_gate_up[:, inter + start:inter + stop]], 1)
            elif gated:
                columns = full_dense.w_gate_up[:, 2 * start:2 * stop]
            else:
                columns = full_dense.w_gate_up[:, start:stop]
            assert torch.equal(local.w_gate_up, columns), f"rank {rank}: gate_up columns differ ({layout}, {gated})"
            total += routed_experts(x.float(), shard, topk_ids, topk_weights, spec).double()
            start = stop
        assert start == inter
        expected = _reference(full, spec, x, topk_ids, topk_weights.double())
        assert_fp32_close(total, expected, name=f"sum of {world_size} shards ({layout}, gated={gated})")


def test_ep_shards_keep_whole_experts_and_their_scales(seed):
    generator = torch.Generator().manual_seed(seed)
    dense = make_expert_weights(5, 16, 12, bias=True, generator=generator)
    full = quantize_fp8_experts(dense["w_gate_up"], dense["w_down"], block_size=8, b_gate_up=dense["b_gate_up"],
                                b_down=dense["b_down"])
    full_dense = dequantize_fp8_experts(full, layout="concatenated", gated=True, dtype=torch.float64)
    first = 0
    for ep_rank, count in enumerate((2, 2, 1)):  # torch.chunk's counts of 5 experts over 3
        shard = shard_fp8_experts(full, layout="concatenated", gated=True, rank=1, world_size=2, ep_rank=ep_rank,
                                  ep_size=3)
        local = dequantize_fp8_experts(shard, layout="concatenated", gated=True, dtype=torch.float64)
        assert shard.w_gate_up.shape[0] == count and shard.scales.gate_up.shape[0] == count
        assert torch.equal(local.w_down, full_dense.w_down[first:first + count, :, 6:12])
        assert torch.equal(shard.b_down, full.b_down[first:first + count])
        assert torch.equal(shard.b_gate_up, torch.cat([full.b_gate_up[first:first + count, 6:12],
                                                       full.b_gate_up[first:first + count, 18:24]], 1))
        first += count


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_native_fp8_forward_matches_reference(case, seed, monkeypatch):
    """The native op (csrc/experts_cpu_quantized.cpp), with the plain path it hands calls that
    want gradients made to fail."""
    import tpmoe.cpu.quantized as native
    monkeypatch.setattr(native, "experts_torch", lambda *args: pytest.fail("took the plain-PyTorch path"))
    assert_native_matches_reference(*_problem(case, seed), shard_fp8_experts)


_PORTABLE_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
import tpmoe.cpu.quantized as native
from support.quantized_cases import (FP8_CASES, FP8_PREFILL_CASE, MXFP4_CASES, MXFP4_PREFILL_CASE, fp8_problem,
                                     mxfp4_problem, reference_on_dequantized, with_dtype)
from support.tolerances import max_rel_error
from tpmoe.fp8 import shard_fp8_experts
from tpmoe.mxfp4 import shard_mxfp4_experts
worst = 0.0
for cases, problem, shard in ((FP8_CASES + [FP8_PREFILL_CASE], fp8_problem, shard_fp8_experts),
                              (MXFP4_CASES + [MXFP4_PREFILL_CASE], mxfp4_problem, shard_mxfp4_experts)):
    for case in cases:
        weights, spec, x, ids, w = problem(case, 0)
        for experts in (weights, shard(weights, layout=spec.layout, gated=spec.gated, rank=1, world_size=3)):
            with torch.no_grad():
                out = native.experts_cpu_quantized(x.float(), with_dtype(experts, torch.float32), ids, w.float(), spec)
            expected = reference_on_dequantized(with_dtype(experts, torch.float64), spec, x, ids, w)
            worst = max(worst, max_rel_error(out, expected.detach()))
print("worst", worst)
"""


def _run_kernel_script(kernel):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TPMOE_CPU_DEQUANT_KERNEL=kernel, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512"])
def test_each_dequant_kernel_matches_the_reference_too(kernel):
    """TPMOE_CPU_DEQUANT_KERNEL forced to each kernel set (portable: CPUs without AVX2; avx2;
    avx512: the fused decode kernels and the split MXFP4 layout) on the fp8 and the MXFP4 cases
    and a prefill case of each (the widened rows), in a
    process of its own (the kernels are chosen once per process). A kernel this CPU lacks is an
    error that says so, and the test skips it."""
    finished = _run_kernel_script(kernel)
    if finished.returncode != 0 and "but this CPU lacks" in finished.stderr:
        pytest.skip(f"this CPU lacks what TPMOE_CPU_DEQUANT_KERNEL={kernel} needs")
    assert finished.returncode == 0, finished.stderr[-3000:]
    worst = float(finished.stdout.split("worst")[-1])
    assert worst <= FP32_RTOL, f"{kernel} kernel: max relative error {worst:.3e} > {FP32_RTOL:.1e}"


@pytest.mark.parametrize("case, problem, decode_rows", [(FP8_PREFILL_CASE, fp8_problem, 256),
                                                        (MXFP4_PREFILL_CASE, mxfp4_problem, 8)], ids=["fp8", "mxfp4"])
def test_prefill_multiplies_with_the_forced_widen_kernel(case, problem, decode_rows, monkeypatch):
    """Past the fused kernels' rows the native op widens the weight rows and multiplies them
    with the widened bf16 GEMM's float32 kernel, TPMOE_CPU_WIDEN_KERNEL read at each call: each
    kernel this CPU has against the reference; each sums in an order of its own (other bits), so
    the one forced is the one that ran; a bad name is an error there too."""
    import tpmoe.cpu.quantized as native
    weights, spec, x, ids, w = problem(case, 0)
    assert torch.bincount(ids.flatten()).min() > decode_rows, "an expert would take a decode kernel"
    experts = with_dtype(weights, torch.float32)
    expected = _reference(with_dtype(weights, torch.float64), spec, x, ids, w).detach()

    def run(kernel):
        monkeypatch.setenv("TPMOE_CPU_WIDEN_KERNEL", kernel)
        with torch.no_grad():
            return native.experts_cpu_quantized(x.float(), experts, ids, w.float(), spec)
    outs = {}
    for kernel in ("avx512", "avx2", "aten"):
        try:
            outs[kernel] = run(kernel)
        except RuntimeError as error:
            if "does not support it" not in str(error):
                raise
            continue
        assert_fp32_close(outs[kernel], expected, name=kernel)
    names = sorted(outs)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not torch.equal(outs[first], outs[second]), f"{first} and {second}: the same bits"
    with pytest.raises(RuntimeError, match="TPMOE_CPU_WIDEN_KERNEL: expected 'avx512', 'avx2', 'aten' or 'auto'"):
        run("sse")


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4])
def test_decode_with_checkpoint_sized_blocks_matches_the_reference(num_tokens):
    """Decode (1-4 rows an expert: the fused kernels under AVX-512, which go 32 values at a time
    through a block and 16 at a time through its tail) with 128-wide blocks, H = 301 (no multiple
    of 16), a TP shard starting 6 values into a block (rank 1 of 3 of I = 400: 134 columns) and an
    expert with no tokens, against the float64 reference."""
    import tpmoe.cpu.quantized as native
    generator = torch.Generator().manual_seed(num_tokens)
    dense = make_expert_weights(3, 301, 400, generator=generator)
    full = quantize_fp8_experts(dense["w_gate_up"], dense["w_down"], block_size=128)
    shard = shard_fp8_experts(full, layout="concatenated", gated=True, rank=1, world_size=3)
    assert shard.scales.block_offset == 6 and shard.w_down.shape[2] == 134
    spec = ExpertSpec()
    ids, w = make_routing(num_tokens, 3, 2, mode="skip_last", generator=generator)
    x = torch.randn(num_tokens, 301, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out = native.experts_cpu_quantized(x.float(), shard, ids, w, spec)
    expected = _reference(with_dtype(shard, torch.float64), spec, x, ids, w.double()).detach()
    assert_fp32_close(out, expected)


def test_a_bad_dequant_kernel_name_is_an_error():
    bad = _run_kernel_script("sse9")
    assert bad.returncode != 0
    assert "TPMOE_CPU_DEQUANT_KERNEL: expected portable, avx2, avx512 or auto, got 'sse9'" in bad.stderr


def _small():
    generator = torch.Generator().manual_seed(0)
    dense = make_expert_weights(2, 16, 8, generator=generator)
    weights = quantize_fp8_experts(dense["w_gate_up"], dense["w_down"], block_size=8)
    x, ids, w = torch.randn(3, 16), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    return weights, x, ids, w


@pytest.mark.parametrize("change, error, match", [
    (lambda w: w._replace(scales=w.scales._replace(gate_up=w.scales.gate_up[..., :1])), ValueError,
     r"weights.scales.gate_up: expected shape \(2, 2, 1, 2\).*got \(2, 2, 1, 1\)"),
    (lambda w: w._replace(scales=w.scales._replace(down=w.scales.down.half())), TypeError,
     "weights.scales.down: expected a float32 tensor, got torch.float16"),
    (lambda w: w._replace(w_down=w.w_down.float()), TypeError,
     "weights.w_down: expected a 3-D torch.float8_e4m3fn tensor for format 'fp8_block', got torch.float32"),
    (lambda w: w._replace(scales=w.scales._replace(block_offset=8)), ValueError,
     r"weights.scales.block_offset: expected an int in \[0, 8\), got 8"),
    (lambda w: w._replace(scales=w.scales._replace(block_size=0)), ValueError,
     "weights.scales.block_size: expected a positive int, got 0"),
    (lambda w: w._replace(scales=None), TypeError,
     "weights.scales: expected a tpmoe.fp8.BlockScales for format 'fp8_block', got NoneType"),
    (lambda w: w._replace(w_gate_up=w.w_gate_up.requires_grad_(True)), ValueError,
     "weights.w_gate_up: fp8 expert weights are frozen"),
])
def test_bad_fp8_weights_name_the_field(change, error, match):
    weights, x, ids, w = _small()
    with pytest.raises(error, match=match):
        routed_experts(x, change(weights), ids, w)


def test_fp8_misuse_outside_the_format():
    weights, x, ids, w = _small()
    with pytest.raises(ValueError, match="layout of fp8_block weights: expected one of"):
        routed_experts(x, weights, ids, w, ExpertSpec(layout="gpt_oss"))
    with pytest.raises(ValueError, match="weights.scales: expected None for format 'dense'"):
        routed_experts(x, ExpertWeights(torch.randn(2, 16, 16), torch.randn(2, 16, 8), scales=weights.scales), ids, w)
    with pytest.raises(ValueError, match="block_size: expected a positive int, got 0"):
        quantize_fp8_experts(torch.randn(2, 16, 16), torch.randn(2, 16, 8), block_size=0)
    assert isinstance(weights.scales, BlockScales)
