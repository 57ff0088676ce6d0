"""The fp8 x fp8 ("w8a8") variant of the Triton forward kernels on fp8_block weights (issue 34):
x and h quantized per token and per scale block in registers (tpmoe.fp8.quantize_fp8_activations'
scheme), fp8 dots, each k-step's product scaled by the row's and the weight block's scales.

Under the interpreter (conftest.py) with TPMOE_FP8_ACTIVATIONS=on. The reference runs the same
w8a8 math in float64: quantize_fp8_activations on x, and on h after rounding h to the compute
dtype (the kernel stores h in it before the down kernel quantizes it), times the dequantized
weights. Tolerances by the project rule (tests/support/tolerances.py): bf16 within twice the
error of the same w8a8 math run in bf16 by PyTorch; fp32 within 1e-5, the rounding of x / scale
being the same float32 division on both sides (where an h value of the kernel and the reference's,
one float32 ulp apart, straddled an e4m3 rounding midpoint the bound would not hold; at these
sizes none does). The compiled sm_90 kernels: tests/ops/test_triton_aot.py.
"""
import pytest
import torch

from support.quantized_cases import case_id, fp8_problem
from support.tolerances import assert_fp32_close, assert_within_twice_same_dtype
from support.triton_problems import DEVICE

pytestmark = [
    pytest.mark.triton,  # skipped where the kernels cannot run (conftest.py)
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import tpmoe.triton.quantized as triton_quantized  # noqa: E402
from tpmoe import routed_experts  # noqa: E402
from tpmoe.fp8 import (FP8_DTYPE, FP8_MAX, dequantize_fp8_activations, quantize_fp8_activations,  # noqa: E402
                       quantize_fp8_experts)
from tpmoe.quantized import dequantize_experts, shard_quantized_experts  # noqa: E402
from tpmoe.reference import _act, gated_activation  # noqa: E402
from tpmoe.triton.dequant import round_to_e4m3  # noqa: E402

ENV = triton_quantized.FP8_ACTIVATIONS_ENV
# (T, H, I, E, K, layout, gated, activation, bias, routing mode, block size): T = 1, primes, an
# expert with no tokens ("skip_last"), gated silu and not gated; B = 16 (interpreter speed).
CASES = [
    (1, 32, 24, 4, 2, "interleaved", True, "silu", True, "random", 16),
    (13, 48, 40, 5, 2, "concatenated", True, "silu", False, "skip_last", 16),
    (7, 40, 24, 3, 3, "concatenated", False, "gelu", True, "skip_last", 16),
]
# TP rank 1 of 3 of I = 10 B + 40 = 200: columns 67 .. 133, block_offset 67 % 16 = 3.
SHARD_CASE = (11, 48, 200, 3, 2, "concatenated", True, "silu", True, "random", 16)
ALL = [(case, None) for case in CASES] + [(SHARD_CASE, (1, 3))]


def _id(item):
    case, shard = item
    return case_id(case) + ("" if shard is None else f"-tp{shard[0]}of{shard[1]}")


@pytest.fixture
def fp8_on(monkeypatch):
    """TPMOE_FP8_ACTIVATIONS=on, and the plain-PyTorch route made to fail."""
    monkeypatch.setenv(ENV, "on")

    def refuse(*args, **kwargs):
        raise AssertionError("the quantized Triton call fell back to experts_torch")
    monkeypatch.setattr(triton_quantized, "experts_torch", refuse)


def _problem(item, seed):
    case, shard = item
    weights, spec, x, topk_ids, topk_weights = fp8_problem(case, seed)
    if shard is not None:
        weights = shard_quantized_experts(weights, spec, tp_rank=shard[0], tp_size=shard[1])
    return weights, spec, x, topk_ids, topk_weights


def _quantized(values, block_size, block_offset, dtype):
    """values as the fp8 x fp8 kernels see them: quantized per row and group, dequantized to dtype."""
    return dequantize_fp8_activations(*quantize_fp8_activations(values, block_size, block_offset), block_size,
                                      block_offset, dtype)


def w8a8_reference(weights, spec, x, topk_ids, topk_weights, dtype, compute_dtype):
    """The w8a8 forward in `dtype` on the dequantized weights: x (in compute_dtype) quantized per
    token and scale block, each expert's h rounded to compute_dtype and quantized likewise (at the
    shard's block offset), each pair's output row rounded to dtype and summed in float64."""
    block, offset = weights.scales.block_size, weights.scales.block_offset
    dense = dequantize_experts(weights, spec, dtype)
    x_q = _quantized(x.to(compute_dtype), block, 0, dtype)
    inter = dense.w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for expert in range(dense.w_gate_up.shape[0]):
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        pre = x_q[tokens] @ dense.w_gate_up[expert].T
        if dense.b_gate_up is not None:
            pre = pre + dense.b_gate_up[expert].to(dtype)
        if spec.gated:
            gate, up = (pre[:, :inter], pre[:, inter:]) if spec.layout == "concatenated" else (pre[:, 0::2],
                                                                                              pre[:, 1::2])
            h = gated_activation(spec.activation, gate, up, spec.alpha, spec.limit)
        else:
            h = _act(spec.activation, pre)
        h_q = _quantized(h.to(compute_dtype), block, offset, dtype)
        y = h_q @ dense.w_down[expert].T
        if dense.b_down is not None:
            y = y + dense.b_down[expert].to(dtype)
        out.index_add_(0, tokens, (topk_weights[tokens, slots].to(dtype)[:, None] * y).to(dtype).double())
    return out


def _run(weights, spec, x, topk_ids, topk_weights, dtype):
    cast = weights._replace(b_gate_up=None if weights.b_gate_up is None else weights.b_gate_up.to(dtype),
                            b_down=None if weights.b_down is None else weights.b_down.to(dtype))
    with torch.no_grad():
        return routed_experts(x.to(dtype), cast, topk_ids, topk_weights.float(), spec, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("item", ALL, ids=_id)
def test_forward_matches_the_w8a8_reference(item, dtype, seed, fp8_on):
    """fp32 within 1e-5 of the float64 w8a8 run; bf16 within twice the error of the same math
    run in bf16 by PyTorch (the module docstring)."""
    if DEVICE != "cpu":
        pytest.skip("CPU tensors under the interpreter only")
    weights, spec, x, topk_ids, topk_weights = _problem(item, seed)
    out = _run(weights, spec, x, topk_ids, topk_weights, dtype)
    expected = w8a8_reference(weights, spec, x, topk_ids, topk_weights, torch.float64, dtype)
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert_fp32_close(out, expected)
    else:
        same_dtype = w8a8_reference(weights, spec, x, topk_ids, topk_weights, dtype, dtype)
        assert_within_twice_same_dtype(out, same_dtype, expected)


def test_off_gives_the_weight_only_result_bitwise(seed, monkeypatch):
    """TPMOE_FP8_ACTIVATIONS=off runs the weight-only kernels: bitwise what a launch without the
    variant gives; "on" gives another (quantized-activation) result on the same inputs."""
    if DEVICE != "cpu":
        pytest.skip("CPU tensors under the interpreter only")
    weights, spec, x, topk_ids, topk_weights = _problem(ALL[-1], seed)
    seen = []
    launches = triton_quantized.forward_launches

    def spy(*args, **kwargs):
        seen.append(kwargs["fp8_activations"])
        return launches(*args, **kwargs)
    monkeypatch.setattr(triton_quantized, "forward_launches", spy)
    results = {}
    for mode in ("off", "auto", "on"):  # auto: no sm_90 under the interpreter, weight-only
        monkeypatch.setenv(ENV, mode)
        results[mode] = _run(weights, spec, x, topk_ids, topk_weights, torch.bfloat16)
    assert seen == [False, False, True]
    monkeypatch.setattr(triton_quantized, "use_fp8_activations", lambda *args: False)
    weight_only = _run(weights, spec, x, topk_ids, topk_weights, torch.bfloat16)
    assert torch.equal(results["off"], weight_only) and torch.equal(results["auto"], weight_only)
    assert not torch.equal(results["on"], weight_only)


def test_auto_takes_the_variant_for_sm90_prefill_only(seed, monkeypatch):
    """"auto": compute capability >= 9.0, bf16 / fp16, at least PREFILL_ROWS routed rows, a block
    size that can be a k-step and a shard starting on a block; the weight-only path otherwise.
    "on" below sm_90 is refused."""
    weights, spec, x, topk_ids, topk_weights = _problem(ALL[1], seed)
    shard = _problem(ALL[-1], seed)[0]
    rows = triton_quantized.PREFILL_ROWS
    prefill = torch.zeros(rows // 2, weights.w_gate_up.shape[2], dtype=torch.bfloat16)
    monkeypatch.delenv(ENV, raising=False)
    choose = triton_quantized.use_fp8_activations
    for capability, expected in ((None, False), (80, False), (89, False), (90, True), (100, True)):
        monkeypatch.setattr(triton_quantized, "device_capability", lambda device: capability)
        assert choose(prefill, weights, 2) is expected, capability
    assert not choose(prefill[:-1], weights, 2)  # a row short of prefill
    assert not choose(prefill.float(), weights, 2)
    assert not choose(prefill, shard, 2)  # block_offset 3
    monkeypatch.setenv(ENV, "off")
    assert not choose(prefill, weights, 2)
    monkeypatch.setenv(ENV, "on")
    assert choose(prefill[:1], shard, 1)
    monkeypatch.setattr(triton_quantized, "device_capability", lambda device: 80)
    with pytest.raises(RuntimeError, match="compute capability"):
        choose(prefill, weights, 2)


def test_bad_mode_and_block_size_are_refused(seed, monkeypatch):
    weights, spec, x, topk_ids, topk_weights = _problem(ALL[0], seed)
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match=ENV):
        _run(weights, spec, x, topk_ids, topk_weights, torch.float32)
    monkeypatch.setenv(ENV, "on")
    generator = torch.Generator().manual_seed(seed)
    odd = quantize_fp8_experts(torch.randn(2, 48, 24, generator=generator, dtype=torch.float64),
                               torch.randn(2, 24, 24, generator=generator, dtype=torch.float64), block_size=12)
    with pytest.raises(ValueError, match="weights.scales.block_size"):
        _run(odd, spec, x[:, :24], topk_ids.clamp(max=1), topk_weights, torch.float32)


def test_quantize_fp8_activations_groups_scales_and_round_trip(seed):
    """Groups aligned to the weight blocks at any offset, scale = group amax / 448 (1 for a zero
    group, whose values stay 0), values e4m3 rounded to nearest: each value within half an e4m3
    step of x / scale, so each group's round trip within amax / 28 (the step at the top binade,
    256 .. 448, is 32)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 40, generator=generator) * torch.logspace(-3, 3, 5)[:, None]
    x[2, :] = 0.0
    x[3, 13:29] = 0.0
    for offset in (0, 3, 15):
        values, scales = quantize_fp8_activations(x, 16, offset)
        groups = -(-(offset + 40) // 16)
        assert values.dtype == FP8_DTYPE and values.shape == (5, 40)
        assert scales.dtype == torch.float32 and scales.shape == (5, groups)
        back = dequantize_fp8_activations(values, scales, 16, offset, torch.float64)
        for group in range(groups):
            cols = slice(max(0, group * 16 - offset), min(40, (group + 1) * 16 - offset))
            amax = x[:, cols].abs().amax(dim=1)
            expected = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            assert torch.equal(scales[:, group], expected)
            error = (back[:, cols] - x[:, cols].double()).abs().amax(dim=1)
            assert (error <= amax.double() / 28).all(), (offset, group)
        assert torch.isfinite(back).all() and (back[2] == 0).all()
        assert torch.equal(values.float(), (x / scales[:, (torch.arange(40) + offset) // 16]).to(FP8_DTYPE).float())
    with pytest.raises(ValueError, match="block_size"):
        quantize_fp8_activations(x, 0)
    with pytest.raises(ValueError, match="block_offset"):
        quantize_fp8_activations(x, 16, 16)
    with pytest.raises(ValueError, match="x:"):
        quantize_fp8_activations(x[None], 16)


@triton.jit
def _round(value_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    value = tl.load(value_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, round_to_e4m3(value), mask=offs < n)


def test_in_register_e4m3_rounding_is_torchs():
    """The interpreter's rounding to e4m3 (round_to_e4m3) against torch's float8_e4m3fn cast: every
    finite e4m3 value, every midpoint between neighbours (ties to even) and a hair either side,
    random values over the whole range, subnormals included."""
    if DEVICE != "cpu":
        pytest.skip("CPU tensors under the interpreter only")
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]),
                        (torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 448,
                        torch.randn(1024, generator=torch.Generator().manual_seed(1)) * 2.0 ** -8])
    out = torch.empty_like(values)
    _round[(triton.cdiv(values.numel(), 1024),)](values, out, values.numel(), BLOCK=1024)
    assert torch.equal(out, values.to(FP8_DTYPE).float())
