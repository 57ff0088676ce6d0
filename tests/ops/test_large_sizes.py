"""Offsets past 2**31 elements: int64 address arithmetic, and clear limits where int32 is kept.

Memory here does not allow a tensor of 2**31 real elements per operand, so:
- the expert weights are strided views whose expert stride puts the last expert's first element
  past 2**31 elements from the base pointer: `torch.empty` of the full extent reserves address
  space only (Linux commits the pages written, a few hundred KB), and the kernels compute
  `expert * stride_we + row * stride_wr + ...` exactly as for a real 8 GiB tensor. An int32
  offset would wrap and read another expert (or fault), so the comparison with the float64
  reference, output and every gradient, is what shows int64;
- the routing metadata, whose pair ids and padded rows ARE int32 (and whose kernels index rows
  with int32 program ids), is exercised on meta tensors at the limit: the last valid size runs
  through the op's fake implementation, one past it is refused with a message naming the bound.
"""
import os

import pytest
import torch

import tpmoe
from support.tolerances import assert_fp32_close
from tpmoe.reference import reference_experts
from tpmoe.routing import align

INT32_MAX = 2**31 - 1
# Expert 2 starts at 2 * (2**30 + 64) = 2**31 + 128 elements (8 GiB of fp32 address space).
EXPERT_STRIDE = 2**30 + 64
# The Triton case runs where the kernels run compiled when it can (a GPU, without the
# interpreter: there the 8 GiB are really allocated, which an H200 holds), on CPU otherwise.
TRITON_DEVICE = ("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


def _strided_past_int32(shape, generator, device="cpu"):
    """A [3, a, b] fp32 tensor whose expert e starts at element e * EXPERT_STRIDE of its storage."""
    num_experts, rows, cols = shape
    storage = torch.empty((num_experts - 1) * EXPERT_STRIDE + rows * cols, dtype=torch.float32, device=device)
    view = storage.as_strided(shape, (EXPERT_STRIDE, cols, 1))
    view.copy_(torch.randn(shape, generator=generator) / cols ** 0.5)
    return view


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("layout", ["concatenated", "gpt_oss"])
def test_expert_offsets_past_2_31_elements(backend, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    T, H, I, E, K = 5, 16, 8, 3, 2
    assert (E - 1) * EXPERT_STRIDE > INT32_MAX  # the case really overflows int32
    gate_up_shape = (E, H, 2 * I) if layout == "gpt_oss" else (E, 2 * I, H)
    down_shape = (E, I, H) if layout == "gpt_oss" else (E, H, I)
    w_gate_up = _strided_past_int32(gate_up_shape, generator, device)
    w_down = _strided_past_int32(down_shape, generator, device)
    x = torch.randn(T, H, generator=generator).to(device)
    # Expert 2 (the one past 2**31) is chosen by most tokens, in both slots.
    topk_ids = torch.tensor([[2, 0], [1, 2], [2, 1], [0, 1], [2, 0]]).to(device)
    topk_weights = (torch.rand(T, K, generator=generator) + 0.1).to(device)
    dy = torch.randn(T, H, generator=generator).to(device)

    leaves = [x, w_gate_up, w_down, topk_weights]
    ours = [t.detach().requires_grad_() for t in leaves]
    y = tpmoe.fused_experts(*ours[:3], topk_ids, ours[3], layout=layout, backend=backend)
    y.backward(dy)
    # The float64 reference on CPU (its weights dense copies: only the values matter to it).
    reference = [t.detach().cpu().double().requires_grad_() for t in leaves]
    y_ref = reference_experts(*reference[:3], topk_ids.cpu(), reference[3], layout=layout)
    y_ref.backward(dy.cpu().double())
    assert_fp32_close(y.cpu(), y_ref, "output")
    for name, mine, theirs in zip(("dx", "dw_gate_up", "dw_down", "dtopk_weights"), ours, reference):
        assert_fp32_close(mine.grad.cpu(), theirs.grad, name)


def test_align_at_the_int32_limit_on_meta_tensors():
    """The largest T*K align accepts runs through its fake (shapes only); its counts and offsets
    are int64, the padded length is the exact bound."""
    num_experts, top_k = 64, 2
    tokens = (INT32_MAX - 1) // top_k  # T*K = 2**31 - 2, the largest allowed
    result = align(torch.empty(tokens, top_k, dtype=torch.int32, device="meta"), num_experts, 1)
    assert result.sorted_pair_ids.shape == (tokens * top_k,) and result.sorted_pair_ids.dtype == torch.int32
    assert result.expert_offsets.dtype == torch.int64 and result.padded_offsets.dtype == torch.int64
    assert result.tokens_per_expert.dtype == torch.int64 and result.num_padded.dtype == torch.int64
    assert result.sorted_ids_padded.shape == (tokens * top_k,)


@pytest.mark.parametrize("tokens, top_k, block_m, pieces", [
    (2**30, 2, 1, ["topk_ids", "T*K < 2**31 - 1", "2147483648"]),
    # T*K fits, but 64 experts padded to 64 rows each push the padded rows past int32.
    (2**30 - 8, 2, 64, ["topk_ids", "padded rows", "2147487664", "block_m = 64"]),
])
def test_align_refuses_sizes_past_int32(tokens, top_k, block_m, pieces):
    with pytest.raises(ValueError) as info:
        align(torch.empty(tokens, top_k, dtype=torch.int64, device="meta"), 64, block_m)
    for piece in pieces:
        assert piece in str(info.value), str(info.value)
