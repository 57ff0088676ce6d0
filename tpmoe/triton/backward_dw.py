"""Grouped weight gradients: dW[e] = A_e^T B_e over expert e's rows, and the bias gradient.

  dW_gate_up[e] = d_preact[rows of e]^T @ x[tokens of e]          (A sorted, B gathered)
  dW_down[e]    = (w * dy[tokens of e])^T @ h[rows of e]           (A gathered and weighted, B sorted)
  db[e]         = sum over rows of A                               (b_gate_up, b_down)
One program per (expert, tile of dW) walks that expert's padded segment
[padded_offsets[e], padded_offsets[e+1]) in chunks of BLOCK_M rows: a per-expert reduction in
a fixed order (deterministic, no atomics). An expert with no tokens has an empty segment:
its program skips the loop and stores zeros.
"""
import torch
import triton
import triton.language as tl

from .interpret import as_dot_operand, dot_flags, require_runnable, round_to, zeros_accumulator
from .tile_configs import KernelConfig


@triton.jit
def backward_dw_kernel(
    # pointers
    a_ptr,               # A_GATHERED: [T, N] read at the pair's token, times its routing weight; else [M, N]
    b_ptr,               # B_GATHERED: [T, Kd] read at the pair's token; else [M, Kd] padded sorted rows
    routing_weight_ptr,  # [num_pairs] flat topk_weights (read only if A_GATHERED)
    sorted_ids_ptr,      # [M] int32 pair ids in padded sorted order; sentinel num_pairs
    padded_offsets_ptr,  # [E+1] int64 start of each expert's padded segment
    dw_ptr,              # out: expert e, n, k at e*stride_oe + n*stride_on + k*stride_ok
    db_ptr,              # [E, N] out: bias gradient (written only if HAS_BIAS_GRAD)
    # sizes
    num_pairs, top_k, N, Kd,
    # strides
    stride_am, stride_an,
    stride_bm, stride_bk,
    stride_oe, stride_on, stride_ok,
    stride_dbe, stride_dbn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_GATHERED: tl.constexpr, B_GATHERED: tl.constexpr, HAS_BIAS_GRAD: tl.constexpr,
    INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    # Row positions fit in int32 (M < 2^31 rows); an int32 loop lets the compiler pipeline it.
    segment_start = tl.load(padded_offsets_ptr + expert).to(tl.int32)
    segment_end = tl.load(padded_offsets_ptr + expert + 1).to(tl.int32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_valid = offs_n < N
    k_valid = offs_k < Kd

    acc = zeros_accumulator(BLOCK_N, BLOCK_K, ACC_FP64)
    bias_acc = tl.sum(acc, axis=1)  # zeros [BLOCK_N]
    for m0 in range(segment_start, segment_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows64 = offs_m.to(tl.int64)
        pair = tl.load(sorted_ids_ptr + offs_m, mask=offs_m < segment_end, other=num_pairs)
        row_valid = pair < num_pairs
        token = (pair // top_k).to(tl.int64)
        a_mask = row_valid[:, None] & n_valid[None, :]
        if A_GATHERED:
            a_tile = tl.load(a_ptr + token[:, None] * stride_am + offs_n[None, :] * stride_an, mask=a_mask,
                             other=0.0)
            routing_weight = tl.load(routing_weight_ptr + pair, mask=row_valid, other=0.0)
            a_weighted = a_tile.to(acc.dtype) * routing_weight.to(acc.dtype)[:, None]
            if HAS_BIAS_GRAD:
                bias_acc += tl.sum(a_weighted, axis=0)
            a_tile = round_to(a_weighted, a_ptr.dtype.element_ty, INTERPRETED)
        else:
            a_tile = tl.load(a_ptr + rows64[:, None] * stride_am + offs_n[None, :] * stride_an, mask=a_mask,
                             other=0.0)
            if HAS_BIAS_GRAD:
                bias_acc += tl.sum(a_tile.to(acc.dtype), axis=0)
        b_mask = row_valid[:, None] & k_valid[None, :]
        if B_GATHERED:
            b_tile = tl.load(b_ptr + token[:, None] * stride_bm + offs_k[None, :] * stride_bk, mask=b_mask,
                             other=0.0)
        else:
            b_tile = tl.load(b_ptr + rows64[:, None] * stride_bm + offs_k[None, :] * stride_bk, mask=b_mask,
                             other=0.0)
        acc = tl.dot(tl.trans(as_dot_operand(a_tile, INTERPRETED)), as_dot_operand(b_tile, INTERPRETED), acc,
                     input_precision=DOT_PRECISION, out_dtype=acc.dtype)

    dw_ptrs = dw_ptr + expert * stride_oe + offs_n.to(tl.int64)[:, None] * stride_on + offs_k[None, :] * stride_ok
    tl.store(dw_ptrs, round_to(acc, dw_ptr.dtype.element_ty, INTERPRETED), mask=n_valid[:, None] & k_valid[None, :])
    if HAS_BIAS_GRAD:
        if pid_k == 0:
            tl.store(db_ptr + expert * stride_dbe + offs_n * stride_dbn,
                     round_to(bias_acc, db_ptr.dtype.element_ty, INTERPRETED),
                     mask=n_valid)


def backward_dw(a, b, routing_weights, sorted_ids_padded, padded_offsets, weight_like, n_axis: int, k_axis: int,
                *, num_pairs: int, top_k: int, a_gathered: bool, b_gathered: bool, bias_grad: bool,
                config: KernelConfig):
    """(dW shaped like weight_like, with its axis n_axis = N = a.shape[1] and k_axis = Kd = b.shape[1];
    db [E, N] or None)."""
    require_runnable(backward_dw_kernel, a.device)
    num_experts = weight_like.shape[0]
    out_size, depth = a.shape[1], b.shape[1]
    assert weight_like.shape[n_axis] == out_size and weight_like.shape[k_axis] == depth
    dw = torch.empty(weight_like.shape, dtype=weight_like.dtype, device=a.device)
    db = torch.empty(num_experts, out_size, dtype=weight_like.dtype, device=a.device) if bias_grad else None
    db_arg = db if db is not None else dw  # never written when HAS_BIAS_GRAD is False
    weight_arg = routing_weights.reshape(-1) if a_gathered else dw
    assert weight_arg.is_contiguous() or not a_gathered
    grid = (num_experts, triton.cdiv(out_size, config.BLOCK_N), triton.cdiv(depth, config.BLOCK_K))
    backward_dw_kernel[grid](
        a, b, weight_arg, sorted_ids_padded, padded_offsets, dw, db_arg,
        num_pairs, top_k, out_size, depth,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        dw.stride(0), dw.stride(n_axis), dw.stride(k_axis),
        db_arg.stride(0), db_arg.stride(1),
        **config.meta(), A_GATHERED=a_gathered, B_GATHERED=b_gathered, HAS_BIAS_GRAD=bias_grad,
        **dot_flags(a.dtype), num_warps=config.num_warps, num_stages=config.num_stages)
    return dw, db
