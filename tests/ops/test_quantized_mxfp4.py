"""MXFP4 experts (tpmoe.mxfp4, format "mxfp4", GPT-OSS's): the packing, TP / EP shards at any size
(down's 32-blocks cut by shard boundaries), and tpmoe.routed_experts on them against the float64
reference run on the dequantized weights (output, and the gradients of everything but the frozen
packed weights)."""
import pytest
import torch

from tpmoe import ExpertSpec, routed_experts
from tpmoe.fp8 import BlockScales
from tpmoe.mxfp4 import E2M1_VALUES, dequantize_mxfp4_experts, quantize_mxfp4_experts, shard_mxfp4_experts

from support.experts_cases import make_expert_weights, make_routing
from support.quantized_cases import (MXFP4_CASES, assert_bf16_within_the_bf16_rule, assert_float32_matches_reference,
                                     assert_native_matches_reference, case_id, mxfp4_problem, reference_on_dequantized,
                                     with_dtype)
from support.tolerances import assert_fp32_close

CASES = MXFP4_CASES
_case_id, _problem, _with_dtype, _reference = case_id, mxfp4_problem, with_dtype, reference_on_dequantized


def test_packing_round_trip_is_within_e2m1_rounding(seed):
    generator = torch.Generator().manual_seed(seed)
    dense = make_expert_weights(3, 70, 40, layout="interleaved", generator=generator)
    weights = quantize_mxfp4_experts(dense["w_gate_up"], dense["w_down"])
    assert weights.format == "mxfp4" and weights.w_gate_up.dtype == torch.uint8
    assert tuple(weights.w_gate_up.shape) == (3, 80, 3, 16) and tuple(weights.scales.down.shape) == (3, 70, 2)
    back = dequantize_mxfp4_experts(weights, layout="interleaved", gated=True, dtype=torch.float64)
    for name, full, scale in (("w_gate_up", dense["w_gate_up"], weights.scales.gate_up),
                              ("w_down", dense["w_down"], weights.scales.down)):
        unit = torch.exp2(scale.double() - 127).repeat_interleave(32, -1)[..., :full.shape[-1]]
        values = getattr(back, name) / unit
        assert set(torch.unique(values).tolist()) <= set(E2M1_VALUES), f"{name}: a value that is not e2m1 times its scale"
        # Nearest rounding: off by at most half e2m1's widest gap (4 to 6), 1 at the block's scale;
        # and the scale is the smallest power of two that fits the block's largest magnitude.
        assert ((getattr(back, name) - full).abs() <= unit).all(), f"{name}: off by more than half a step"
        assert (full.abs() <= 6 * unit).all() and (getattr(back, name) != full).any()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_mxfp4_experts_float32_match_reference_on_dequantized_weights(case, seed):
    assert_float32_matches_reference(*_problem(case, seed))


@pytest.mark.parametrize("case", CASES[:2], ids=_case_id)
def test_mxfp4_experts_bf16_within_twice_a_bf16_torch_run(case, seed):
    assert_bf16_within_the_bf16_rule(*_problem(case, seed))


@pytest.mark.parametrize("world_size, inter", [(2, 45), (3, 45), (3, 2880), (4, 90)])
def test_tp_shards_at_any_size_hold_exactly_their_columns(world_size, inter, seed):
    """I over P by torch.chunk's rule, shards that are no multiple of 32 (GPT-OSS's I = 2880 over 3
    is 960, over 4 would be 720; 45 over 2: 23 + 22; 90 over 4: 23, 23, 23, 21): each dequantizes
    to exactly its columns of the full weights, and the partial outputs sum to the full block's."""
    hidden, experts, top_k, num_tokens = 40, 3, 2, 7
    generator = torch.Generator().manual_seed(seed)
    for layout, gated in (("interleaved", True), ("concatenated", True), ("interleaved", False)):
        dense = make_expert_weights(experts, hidden, inter, layout=layout, gated=gated, bias=True, generator=generator)
        full = quantize_mxfp4_experts(dense["w_gate_up"], dense["w_down"], layout=layout, gated=gated,
                                      b_gate_up=dense["b_gate_up"])
        full_dense = dequantize_mxfp4_experts(full, layout=layout, gated=gated, dtype=torch.float64)
        spec = ExpertSpec(activation="clamped_swiglu" if gated else "gelu", layout=layout, gated=gated)
        topk_ids, topk_weights = make_routing(num_tokens, experts, top_k, generator=generator)
        x = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64) * 4
        total = torch.zeros(num_tokens, hidden, dtype=torch.float64)
        start = 0
        for rank in range(world_size):
            shard = shard_mxfp4_experts(full, layout=layout, gated=gated, rank=rank, world_size=world_size)
            local = dequantize_mxfp4_experts(shard, layout=layout, gated=gated, dtype=torch.float64)
            stop = start + local.w_down.shape[2]
            assert torch.equal(local.w_down, full_dense.w_down[:, :, start:stop])
            halves = {("interleaved", True): lambda w: w[:, 2 * start:2 * stop],
                      ("concatenated", True): lambda w: torch.cat([w[:, start:stop], w[:, inter + start:inter + stop]], 1),
                      ("interleaved", False): lambda w: w[:, start:stop]}[(layout, gated)]
            assert torch.equal(local.w_gate_up, halves(full_dense.w_gate_up)), (rank, layout, gated)
            assert torch.equal(shard.b_gate_up, halves(full.b_gate_up))
            total += routed_experts(x.float(), _with_dtype(shard, torch.float32), topk_ids, topk_weights, spec).double()
            start = stop
        assert start == inter
        expected = _reference(full, spec, x, topk_ids, topk_weights.double())
        assert_fp32_close(total, expected, name=f"sum of {world_size} shards ({layout}, gated={gated})")


def test_ep_shards_keep_whole_experts_and_their_scales(seed):
    generator = torch.Generator().manual_seed(seed)
    dense = make_expert_weights(5, 40, 36, layout="interleaved", generator=generator)
    full = quantize_mxfp4_experts(dense["w_gate_up"], dense["w_down"])
    full_dense = dequantize_mxfp4_experts(full, layout="interleaved", gated=True, dtype=torch.float64)
    first = 0
    for ep_rank, count in enumerate((2, 2, 1)):
        shard = shard_mxfp4_experts(full, layout="interleaved", gated=True, rank=0, world_size=1, ep_rank=ep_rank,
                                    ep_size=3)
        local = dequantize_mxfp4_experts(shard, layout="interleaved", gated=True, dtype=torch.float64)
        assert shard.scales.gate_up.shape[0] == count
        assert torch.equal(local.w_gate_up, full_dense.w_gate_up[first:first + count])
        assert torch.equal(local.w_down, full_dense.w_down[first:first + count])
        first += count


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_native_mxfp4_forward_matches_reference(case, seed, monkeypatch):
    """The native op (csrc/experts_cpu_quantized.cpp), with the plain path it hands calls that
    want gradients made to fail."""
    import tpmoe.cpu.quantized as native
    monkeypatch.setattr(native, "experts_torch", lambda *args: pytest.fail("took the plain-PyTorch path"))
    assert_native_matches_reference(*_problem(case, seed), shard_mxfp4_experts)


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_native_decode_with_rows_of_whole_lines_and_a_rest(num_tokens, monkeypatch):
    """Decode (a few rows an expert: the fused kernel under AVX-512, which takes each row a line
    of 4 blocks at a time, then the blocks left one at a time) with H = 301 (10 blocks) and
    I = 200 (7 blocks; rank 1 of 3 starts 3 values into one), an expert with no tokens, whole and
    sharded."""
    import tpmoe.cpu.quantized as native
    monkeypatch.setattr(native, "experts_torch", lambda *args: pytest.fail("took the plain-PyTorch path"))
    case = (num_tokens, 301, 200, 3, 2, "interleaved", True, "clamped_swiglu", 1.702, 7.0, True, "skip_last")
    assert_native_matches_reference(*_problem(case, num_tokens), shard_mxfp4_experts)


def _small():
    generator = torch.Generator().manual_seed(0)
    dense = make_expert_weights(2, 40, 36, layout="interleaved", generator=generator)
    weights = quantize_mxfp4_experts(dense["w_gate_up"], dense["w_down"])
    x, ids, w = torch.randn(3, 40), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    return weights, x, ids, w, ExpertSpec(activation="clamped_swiglu", layout="interleaved")


@pytest.mark.parametrize("change, error, match", [
    (lambda w: w._replace(scales=w.scales._replace(down=w.scales.down.float())), TypeError,
     "weights.scales.down: expected a uint8 tensor for format 'mxfp4'.*got torch.float32"),
    (lambda w: w._replace(w_down=w.w_down[..., :8]), ValueError,
     r"weights.w_down: expected shape \(2, 40, 2, 16\).*got \(2, 40, 2, 8\)"),
    (lambda w: w._replace(scales=w.scales._replace(gate_up=w.scales.gate_up[:, :, :1])), ValueError,
     r"weights.scales.gate_up: expected shape \(2, 72, 2\).*got \(2, 72, 1\)"),
    (lambda w: w._replace(w_gate_up=w.w_gate_up[:, :71]), ValueError,
     "weights.w_gate_up: gated experts need an even gate\\+up size on axis 1, got 71"),
    (lambda w: w._replace(scales=w.scales._replace(block_size=16)), ValueError,
     "weights.scales.block_size: expected 32 \\(MXFP4's block\\), got 16"),
    (lambda w: w._replace(scales=w.scales._replace(block_offset=32)), ValueError,
     r"weights.scales.block_offset: expected an int in \[0, 32\), got 32"),
    (lambda w: w._replace(scales=None), TypeError, "weights.scales: expected a tpmoe.fp8.BlockScales"),
    (lambda w: w._replace(w_gate_up=w.w_gate_up.float()), TypeError,
     "weights.w_gate_up: expected a uint8 tensor for format 'mxfp4'"),
])
def test_bad_mxfp4_weights_name_the_field(change, error, match):
    weights, x, ids, w, spec = _small()
    with pytest.raises(error, match=match):
        routed_experts(x, change(weights), ids, w, spec)


def test_mxfp4_misuse_outside_the_format():
    weights, x, ids, w, spec = _small()
    with pytest.raises(ValueError, match="layout of mxfp4 weights: expected one of"):
        routed_experts(x, weights, ids, w, ExpertSpec(layout="gpt_oss"))
    with pytest.raises(ValueError, match="layout: expected one of"):
        quantize_mxfp4_experts(torch.randn(2, 8, 32), torch.randn(2, 32, 4), layout="gpt_oss")
    assert isinstance(weights.scales, BlockScales)
