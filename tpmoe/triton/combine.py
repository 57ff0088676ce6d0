"""The combine: y[t] = sum_k sum_s partial[s, t*K + k], one launch, fixed order, no atomics.

The down kernel (forward) and the dx launch (backward) write one row per (token, k) pair per
split, [SPLIT, T*K, N] (fp32; bf16/fp16 rows for half-precision inputs without a split; fp64
for float64: `down.pair_dtype`). This kernel reads each of them once,
sums in registers in a fixed order (for each k in 0..K-1: that pair's splits 0..SPLIT-1,
then added to the running sum over k), in fp32 (fp64 for float64), and writes [T, N] in the
output dtype, rounded once. That replaces a torch sum over k plus a cast (two launches and an
fp32 [T, N] intermediate), and makes the result independent of torch's reduction order.

Grid: (T, cdiv(N, BLOCK_N)); tokens on the first axis (2^31 programs, the others 65535).
Each program reads SPLIT * K rows of BLOCK_N contiguous values (4 per thread: 16-byte loads).

Why half-precision pair rows are accurate enough, and why split partials stay fp32: see the
docstring of tpmoe/triton/down.py.
"""
import torch
import triton
import triton.language as tl

from .interpret import interpreter_active, require_runnable, round_to

BLOCK_N = 512
NUM_WARPS = 4


@triton.jit
def combine_kernel(
    partial_ptr,   # [SPLIT, T*K, N] (down.pair_dtype): pair p's split s at s*stride_ps + p*stride_pp
    out_ptr,       # [T, N] out, in the output dtype
    top_k, num_splits, N,
    stride_ps, stride_pp, stride_pn,
    stride_ot, stride_on,
    BLOCK_N: tl.constexpr, ACC_FP64: tl.constexpr, INTERPRETED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = offs_n < N
    if ACC_FP64:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_ptrs = partial_ptr + token * top_k * stride_pp + offs_n * stride_pn
    for k in range(0, top_k):
        pair_sum = tl.zeros_like(acc)
        for s in range(0, num_splits):
            part = tl.load(row_ptrs + s * stride_ps, mask=col_valid, other=0.0)
            pair_sum += part.to(acc.dtype)
        acc += pair_sum
        row_ptrs += stride_pp
    out_ptrs = out_ptr + token * stride_ot + offs_n * stride_on
    tl.store(out_ptrs, round_to(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=col_valid)


def combine(partials: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """[SPLIT, T*K, N] (or [T*K, N]) partial pair rows -> [T, N] in `dtype`: the sum over splits
    and k slots in a fixed order, accumulated in fp32 (fp64 for float64 partials), rounded once."""
    require_runnable(combine_kernel, partials.device)
    if partials.dim() == 2:
        partials = partials.unsqueeze(0)
    num_splits, num_pairs, width = partials.shape
    assert num_pairs == num_tokens * top_k, f"{num_pairs} pair rows for {num_tokens} tokens x {top_k}"
    out = torch.empty(num_tokens, width, dtype=dtype, device=partials.device)
    if num_tokens == 0 or width == 0:
        return out
    grid = (num_tokens, triton.cdiv(width, BLOCK_N))
    combine_kernel[grid](
        partials, out, top_k, num_splits, width,
        partials.stride(0), partials.stride(1), partials.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_N=BLOCK_N, ACC_FP64=partials.dtype == torch.float64, INTERPRETED=interpreter_active(),
        num_warps=NUM_WARPS)
    return out
