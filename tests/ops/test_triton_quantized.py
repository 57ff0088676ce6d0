"""The Triton forward kernels on quantized expert weights ("fp8_block", "mxfp4"), dequantized in
their B-load (tpmoe.triton.dequant), against the float64 reference on the dequantized weights.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py). Cases (tests/support/quantized_cases.py):
both gate/up packings, gated and not, GPT-OSS's clamped swiglu with its limits, T = 1, an expert
with no tokens; each on the whole experts and on TP rank 1 of 3, whose shard starts inside a
scale block (block_offset > 0, I_p no multiple of the block). fp32 within 1e-5, bf16 within
twice a same-dtype PyTorch run. The compiled kernels: tests/ops/test_triton_aot.py.
"""
import pytest
import torch

from support.quantized_cases import (FP8_CASES, MXFP4_CASES, assert_bf16_within_the_bf16_rule,
                                     assert_float32_matches_reference, case_id, fp8_problem, mxfp4_problem,
                                     reference_on_dequantized, with_dtype)
from support.tolerances import assert_fp32_close
from support.triton_problems import DEVICE

pytestmark = [
    pytest.mark.triton,  # skipped where the kernels cannot run (conftest.py)
    # The interpreter's tl.sigmoid overflows exp(-x) for x << 0; 1 / (1 + inf) = 0 is right.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import tpmoe.triton.quantized as triton_quantized  # noqa: E402
from tpmoe import ExpertSpec, routed_experts  # noqa: E402
from tpmoe.fp8 import quantize_fp8_experts  # noqa: E402
from tpmoe.mxfp4 import E2M1_VALUES  # noqa: E402
from tpmoe.quantized import shard_quantized_experts  # noqa: E402
from tpmoe.triton.dequant import e2m1_to_float32, e4m3_to_float32, e8m0_to_float32  # noqa: E402

CASES = [(fp8_problem, case) for case in FP8_CASES] + [(mxfp4_problem, case) for case in MXFP4_CASES]
SHARDS = {"full": None, "tp1of3": (1, 3)}


def _ids(item):
    problem, case = item
    return f"{problem.__name__.split('_')[0]}-{case_id(case)}"


def _on_device(weights, *tensors):
    moved = weights._replace(**{name: None if value is None else value.to(DEVICE) for name, value in
                                (("w_gate_up", weights.w_gate_up), ("w_down", weights.w_down),
                                 ("b_gate_up", weights.b_gate_up), ("b_down", weights.b_down))},
                             scales=weights.scales._replace(gate_up=weights.scales.gate_up.to(DEVICE),
                                                            down=weights.scales.down.to(DEVICE)))
    return (moved, *(tensor.to(DEVICE) for tensor in tensors))


def _problem(item, shard, seed):
    problem, case = item
    weights, spec, x, topk_ids, topk_weights = problem(case, seed)
    if SHARDS[shard] is not None:
        rank, size = SHARDS[shard]
        weights = shard_quantized_experts(weights, spec, tp_rank=rank, tp_size=size)
    return weights, spec, x, topk_ids, topk_weights


@pytest.fixture
def kernels_only(monkeypatch):
    """The plain-PyTorch route made to fail: a call that passes ran the dequantizing kernels."""
    def refuse(*args, **kwargs):
        raise AssertionError("the quantized Triton call fell back to experts_torch")
    monkeypatch.setattr(triton_quantized, "experts_torch", refuse)


@pytest.mark.parametrize("shard", list(SHARDS))
@pytest.mark.parametrize("item", CASES, ids=_ids)
def test_float32_forward_matches_reference_on_dequantized_weights(item, shard, seed, kernels_only):
    weights, spec, x, topk_ids, topk_weights = _problem(item, shard, seed)
    expected = reference_on_dequantized(with_dtype(weights, torch.float64), spec, x, topk_ids, topk_weights)
    ours, x32, ids, w32 = _on_device(with_dtype(weights, torch.float32), x.float(), topk_ids, topk_weights.float())
    with torch.no_grad():
        out = routed_experts(x32, ours, ids, w32, spec, backend="triton")
    assert out.dtype == torch.float32
    assert_fp32_close(out.cpu(), expected.detach())


@pytest.mark.parametrize("shard", list(SHARDS))
@pytest.mark.parametrize("item", CASES, ids=_ids)
def test_bf16_forward_within_twice_a_bf16_torch_run(item, shard, seed, kernels_only):
    weights, spec, x, topk_ids, topk_weights = _problem(item, shard, seed)
    if DEVICE != "cpu":  # the helper compares on CPU tensors
        pytest.skip("CPU tensors under the interpreter only")
    assert_bf16_within_the_bf16_rule(weights, spec, x, topk_ids, topk_weights, backend="triton")


def test_fp8_block_128_shard_inside_a_block_and_decode_split(seed, kernels_only):
    """DeepSeek's block size 128, I = 200 over 3 ranks: rank 1 holds I_p = 67 from column 67,
    inside the first scale block, and H = 136 ends in a partial block; T = 1 takes the decode
    configs (the down kernel split over I_p)."""
    generator = torch.Generator().manual_seed(seed)
    experts, hidden, inter = 3, 136, 200
    full = quantize_fp8_experts(torch.randn(experts, 2 * inter, hidden, generator=generator, dtype=torch.float64)
                                / hidden ** 0.5,
                                torch.randn(experts, hidden, inter, generator=generator, dtype=torch.float64)
                                / inter ** 0.5, layout="interleaved", block_size=128)
    spec = ExpertSpec(activation="clamped_swiglu", layout="interleaved", alpha=1.702, limit=7.0)
    weights = shard_quantized_experts(full, spec, tp_rank=1, tp_size=3)
    assert weights.scales.block_offset == 67 and weights.w_down.shape[2] == 67
    for num_tokens in (1, 9):
        x = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64)
        topk_ids = torch.rand(num_tokens, experts, generator=generator).topk(2, dim=1).indices
        topk_weights = torch.rand(num_tokens, 2, generator=generator, dtype=torch.float64)
        expected = reference_on_dequantized(weights, spec, x, topk_ids, topk_weights)
        ours, x32, ids, w32 = _on_device(weights, x.float(), topk_ids, topk_weights.float())
        with torch.no_grad():
            out = routed_experts(x32, ours, ids, w32, spec, backend="triton")
        assert_fp32_close(out.cpu(), expected, name=f"T={num_tokens}")


@pytest.mark.parametrize("item", [CASES[0], CASES[len(FP8_CASES)]], ids=_ids)
def test_calls_that_need_gradients_take_the_plain_pytorch_route(item, seed, monkeypatch):
    """Quantized weights are frozen: where x, the routing weights or the biases want a gradient,
    backend "triton" runs tpmoe.cpu.experts_torch on the dequantized experts, as backend "cpu"
    does, and the gradients match the reference's."""
    if DEVICE != "cpu":
        pytest.skip("CPU tensors under the interpreter only")
    weights, spec, x, topk_ids, topk_weights = _problem(item, "tp1of3", seed)
    calls = []
    plain = triton_quantized.experts_torch

    def counted(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)
    monkeypatch.setattr(triton_quantized, "experts_torch", counted)
    assert_float32_matches_reference(weights, spec, x, topk_ids, topk_weights, backend="triton")
    assert calls == [1]


@triton.jit
def _decode(byte_ptr, e4m3_ptr, e2m1_ptr, e8m0_ptr):
    offs = tl.arange(0, 256)
    byte = tl.load(byte_ptr + offs)
    tl.store(e4m3_ptr + offs, e4m3_to_float32(byte))
    tl.store(e2m1_ptr + offs, e2m1_to_float32(byte & 15))
    tl.store(e8m0_ptr + offs, e8m0_to_float32(byte))


def test_decoders_match_the_formats_value_tables():
    """The in-register decoders against torch's float8_e4m3fn (every byte but the NaNs 0x7F, 0xFF),
    tpmoe.mxfp4's e2m1 table (every nibble) and e8m0's 2^(s - 127) (s = 1 .. 254)."""
    if DEVICE != "cpu":
        pytest.skip("CPU tensors under the interpreter only")
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    e4m3, e2m1, e8m0 = (torch.empty(256) for _ in range(3))
    _decode[(1,)](byte, e4m3, e2m1, e8m0)
    finite = (byte & 0x7F) != 0x7F
    assert torch.equal(e4m3[finite], byte.view(torch.float8_e4m3fn).float()[finite])
    assert torch.equal(e2m1[:16], torch.tensor(E2M1_VALUES, dtype=torch.float32))
    scales = torch.arange(1, 255)
    assert torch.equal(e8m0[1:255], torch.exp2(scales.double() - 127).float())
