"""Grouped "rows times expert weight, scattered to pair rows" kernel: the forward down
projection, and (with other operands) the backward dx.

Forward:  out[p] = topk_weight[p] * (h[row] @ W_down[e]^T + b_down[e])   for row's pair p
dx:       out[p] = d_preact[row] @ W_gate_up[e]                          (no bias, no weight)
Rows come in padded sorted order; each pair p owns one output row [num_pairs, N], so the
sum over the k slots afterwards is a plain deterministic reduction (`combine_pairs`), with
no atomics. The pair rows are kept in fp32 (fp64 for float64): the sum over k is part of the
accumulation, and rounding each row to bf16 before it measurably doubled the output error
against a same-dtype PyTorch run in some cases; the price is 2 more bytes per element of this
[T*K, H] buffer, written once and read once.
"""
import torch
import triton
import triton.language as tl

from .interpret import as_dot_operand, dot_flags, require_runnable, round_to, zeros_accumulator
from .tile_configs import KernelConfig


@triton.jit
def grouped_scatter_kernel(
    # pointers
    a_ptr,               # [M, Kdim] rows in padded sorted order (h, or d_preact for dx)
    w_ptr,               # expert e's [N, Kdim] matrix at e*stride_we + n*stride_wn + k*stride_wk
    bias_ptr,            # [E, N] added before the routing weight (read only if HAS_BIAS)
    routing_weight_ptr,  # [num_pairs] flat topk_weights (read only if SCALE_BY_WEIGHT)
    sorted_ids_ptr,      # [M] int32 pair ids in padded sorted order; sentinel num_pairs
    block_expert_ptr,    # [cdiv(M, BLOCK_M)] int32, -1 past the used rows
    out_ptr,             # [num_pairs, N] out: one row per (token, k) pair
    # sizes
    num_pairs, N, Kdim,
    # strides
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_be, stride_bn,
    stride_op, stride_on,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE_BY_WEIGHT: tl.constexpr,
    INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # padding blocks past num_padded
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_valid = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = zeros_accumulator(BLOCK_M, BLOCK_N, ACC_FP64)
    for k0 in range(0, Kdim, BLOCK_K):
        k_valid = offs_k < Kdim - k0
        a_tile = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(as_dot_operand(a_tile, INTERPRETED), as_dot_operand(w_tile, INTERPRETED), acc,
                     input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=col_valid, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    if SCALE_BY_WEIGHT:
        routing_weight = tl.load(routing_weight_ptr + pair, mask=row_valid, other=0.0)
        acc = acc * routing_weight.to(acc.dtype)[:, None]
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_op + offs_n[None, :] * stride_on
    tl.store(out_ptrs, round_to(acc, out_ptr.dtype.element_ty, INTERPRETED),
             mask=row_valid[:, None] & col_valid[None, :])


def grouped_scatter(rows, weight, n_axis: int, k_axis: int, bias, routing_weights, sorted_ids_padded,
                    block_expert, *, num_pairs: int, config: KernelConfig) -> torch.Tensor:
    """out [num_pairs, N] fp32: rows @ weight[e]^T (+ bias[e]) (* routing weight) per pair.

    weight is read in place: its axis n_axis is N (the output) and k_axis is Kdim (= rows.shape[1]).
    """
    require_runnable(grouped_scatter_kernel, rows.device)
    num_rows, depth = rows.shape
    out_size = weight.shape[n_axis]
    assert weight.shape[k_axis] == depth, f"weight axis {k_axis} is {weight.shape[k_axis]}, rows have {depth}"
    assert block_expert.shape[0] * config.BLOCK_M >= num_rows, "block_expert does not cover sorted_ids_padded"
    out_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = torch.empty(num_pairs, out_size, dtype=out_dtype, device=rows.device)
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    weight_arg = routing_weights.reshape(-1) if routing_weights is not None else out
    assert routing_weights is None or weight_arg.is_contiguous()
    grid = (block_expert.shape[0], triton.cdiv(out_size, config.BLOCK_N))
    grouped_scatter_kernel[grid](
        rows, weight, bias_arg, weight_arg, sorted_ids_padded, block_expert, out,
        num_pairs, out_size, depth,
        rows.stride(0), rows.stride(1),
        weight.stride(0), weight.stride(n_axis), weight.stride(k_axis),
        bias_arg.stride(0), bias_arg.stride(-1),
        out.stride(0), out.stride(1),
        **config.meta(), HAS_BIAS=bias is not None, SCALE_BY_WEIGHT=routing_weights is not None,
        **dot_flags(rows.dtype), num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def combine_pairs(pair_rows: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """[T*K, N] fp32 -> [T, N] in `dtype`: the sum over k in a fixed order (deterministic)."""
    summed = pair_rows.view(num_tokens, top_k, -1).sum(dim=1)
    # No .to() where it would return its input: torch 2.11's Dynamo routes the gradient of an
    # autograd.Function output made by such an aliasing no-op to the wrong slot (zeros, fp32).
    return summed if summed.dtype == dtype else summed.to(dtype)
