"""Grouped weight gradients: dW[e] = A_e^T B_e over expert e's rows, and the bias gradient.

  dW_gate_up[e] = d_preact[rows of e]^T @ x[tokens of e]          (A sorted, B gathered)
  dW_down[e]    = (w * dy[tokens of e])^T @ h[rows of e]           (A gathered and weighted, B sorted)
  db[e]         = sum over rows of A                               (b_gate_up, b_down)

Grid: 1-D, E * SPLIT slots x (N tiles x Kd tiles), the slot slowest: program pid is slot
pid // tiles (slot = e * SPLIT + s) and dW tile (n, k) = `grid.grouped_tile`(pid % tiles) over
the n tiles in groups of GROUP_M (each group walks every k tile with its GROUP_M n tiles
fastest; GROUP_M = 1: k fastest). So the programs in flight belong to one expert (and
chunk): its A rows (a stripe of BLOCK_N columns per n tile) and B rows (BLOCK_K columns per k
tile) are read from DRAM about once and then hit L2 while the expert's tiles run. (The former
3-D grid ran the expert fastest: each wave touched every expert, and at T = 16384 A was re-read
once per k tile, B once per n tile.) The order only permutes the programs; each program's
reduction is unchanged, so the result is bit for bit the same whatever GROUP_M.

Program (slot, n, k) reduces the tile (n, k)
of dW[e] over chunk s of expert e's padded segment [padded_offsets[e], padded_offsets[e+1]):
the segment cut into SPLIT contiguous chunks of whole BLOCK_M-row steps (the last ones
shorter or empty), walked in BLOCK_M-row steps in order. SPLIT = 1 (the usual case): the
program walks the whole segment and writes dW and db directly. SPLIT > 1 (few experts with
many rows each, a grid too small to fill the GPU: tile_configs.backward_dw_split): each
program writes an fp32 partial of dW and db to its own slot of one buffer, and one small
elementwise launch (`split_sum_kernel`) adds the SPLIT slots in a fixed order and rounds
once. Deterministic, no atomics, whatever SPLIT. An expert with no tokens (or a chunk past
the end of its segment) skips the loop and stores zeros.

The row loop is software-pipelined (num_stages from the table; its loads are indirect, after
the step's pair ids, so the tiles get num_stages - 2 shared-memory buffers). A load feeding
anything but a dot would leave the pipeline, so the gate_up bias gradient (A read in place) is
one more small dot, db += A^T @ ones [BLOCK_M, 16] (wgmma m64n16 beside the main one, exact
fp32 sums); for dW_down the weighted A is formed in registers anyway and db sums it there, in
fp32 before the rounding.

Offsets: row positions and pair ids are int32 (align bounds M and T*K below 2^31); products
with strides that can pass 2^31 (split and expert slots, dW's n and k offsets, which reach
N*Kd for the transposed gpt_oss storage, token rows) are int64.
"""
import torch
import triton
import triton.language as tl

from .grid import grouped_tile, tile_grid_size
from .interpret import as_dot_operand, dot_flags, require_runnable, round_to, zeros_accumulator
from .layouts import readable_width
from .tile_configs import KernelConfig


@triton.jit
def backward_dw_kernel(
    # pointers
    a_ptr,               # A_GATHERED: [T, N] read at the pair's token, times its routing weight; else [M, N]
    b_ptr,               # B_GATHERED: [T, Kd] read at the pair's token; else [M, Kd] padded sorted rows
    routing_weight_ptr,  # [num_pairs] flat topk_weights (read only if A_GATHERED)
    sorted_ids_ptr,      # [M] int32 pair ids in padded sorted order; sentinel num_pairs
    padded_offsets_ptr,  # [E+1] int64 start of each expert's padded segment
    dw_ptr,              # out: split s, expert e, n, k at s*stride_os + e*stride_oe + n*stride_on + k*stride_ok
    db_ptr,              # out: split s, expert e, n at s*stride_dbs + e*stride_dbe + n*stride_dbn (if HAS_BIAS_GRAD)
    # sizes
    num_pairs, top_k, N, Kd,
    N_a,                 # A's columns loaded below this: N, or N padded where A has it in memory
    Kd_b,                # B's columns loaded below this: Kd, or Kd padded
    # strides
    stride_am, stride_an,
    stride_bm, stride_bk,
    stride_os, stride_oe, stride_on, stride_ok,
    stride_dbs, stride_dbe, stride_dbn,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr, A_GATHERED: tl.constexpr, B_GATHERED: tl.constexpr, HAS_BIAS_GRAD: tl.constexpr,
    INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
):
    # The slot (expert, chunk) slowest, so that consecutive programs share its rows of A and B;
    # within it the dW tiles in grouped order (module docstring).
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_k_tiles = tl.cdiv(Kd, BLOCK_K)
    tiles = num_n_tiles * num_k_tiles
    slot = pid // tiles
    pid_n, pid_k = grouped_tile(pid % tiles, num_n_tiles, num_k_tiles, GROUP_M)
    expert = (slot // SPLIT).to(tl.int64)
    split = slot % SPLIT
    # Row positions fit in int32 (M < 2^31 rows); an int32 loop lets the compiler pipeline it.
    row_start = tl.load(padded_offsets_ptr + expert).to(tl.int32)
    row_end = tl.load(padded_offsets_ptr + expert + 1).to(tl.int32)
    if SPLIT > 1:  # chunk `split` of the segment, in whole BLOCK_M steps
        chunk = tl.cdiv(tl.cdiv(row_end - row_start, BLOCK_M), SPLIT) * BLOCK_M
        row_start = row_start + split * chunk
        row_end = tl.minimum(row_end, row_start + chunk)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_valid = offs_n < N
    k_valid = offs_k < Kd
    # N and Kd are dW's output axes, not reduced: A and B load up to their padded widths where
    # the launcher found them in memory (multiples of 16, so the masks on these contiguous axes
    # keep 16-byte copies); the extra rows / columns of the tile are never stored.
    n_load = offs_n < N_a
    k_load = offs_k < Kd_b

    acc = zeros_accumulator(BLOCK_N, BLOCK_K, ACC_FP64)
    bias_acc = tl.sum(acc, axis=1)  # zeros [BLOCK_N]
    if HAS_BIAS_GRAD and not A_GATHERED:
        ones = as_dot_operand(tl.full((BLOCK_M, 16), 1.0, dtype=a_ptr.dtype.element_ty), INTERPRETED)
        acc_db = zeros_accumulator(BLOCK_N, 16, ACC_FP64)  # every column is db; column 0 is kept
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m, mask=offs_m < row_end, other=num_pairs)
        row_valid = pair < num_pairs
        token = (pair // top_k).to(tl.int64)
        a_mask = row_valid[:, None] & n_load[None, :]
        if A_GATHERED:
            a_tile = tl.load(a_ptr + token[:, None] * stride_am + offs_n[None, :] * stride_an, mask=a_mask,
                             other=0.0)
            routing_weight = tl.load(routing_weight_ptr + pair, mask=row_valid, other=0.0)
            a_weighted = a_tile.to(acc.dtype) * routing_weight.to(acc.dtype)[:, None]
            if HAS_BIAS_GRAD:
                bias_acc += tl.sum(a_weighted, axis=0)
            a_tile = round_to(a_weighted, a_ptr.dtype.element_ty, INTERPRETED)
        else:
            a_tile = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_n[None, :] * stride_an,
                             mask=a_mask, other=0.0)
            if HAS_BIAS_GRAD:
                # db += A^T @ 1 on the tensor cores: a sum of the tile in registers would take it
                # out of the software pipeline (the loads feeding only dots stream into shared memory).
                # "ieee": a sum is exact in fp32 (fp32 inputs with TF32 allowed would round A to TF32).
                acc_db = tl.dot(tl.trans(as_dot_operand(a_tile, INTERPRETED)), ones, acc_db,
                                input_precision="ieee", out_dtype=acc_db.dtype)
        b_mask = row_valid[:, None] & k_load[None, :]
        if B_GATHERED:
            b_tile = tl.load(b_ptr + token[:, None] * stride_bm + offs_k[None, :] * stride_bk, mask=b_mask,
                             other=0.0)
        else:
            b_tile = tl.load(b_ptr + offs_m.to(tl.int64)[:, None] * stride_bm + offs_k[None, :] * stride_bk,
                             mask=b_mask, other=0.0)
        acc = tl.dot(tl.trans(as_dot_operand(a_tile, INTERPRETED)), as_dot_operand(b_tile, INTERPRETED), acc,
                     input_precision=DOT_PRECISION, out_dtype=acc.dtype)

    # int64 offsets: split * stride_os (E*N*Kd), expert * stride_oe and n * stride_on / k * stride_ok
    # (up to N*Kd for the transposed gpt_oss storage) can pass 2^31.
    dw_ptrs = (dw_ptr + split.to(tl.int64) * stride_os + expert * stride_oe
               + offs_n.to(tl.int64)[:, None] * stride_on + offs_k.to(tl.int64)[None, :] * stride_ok)
    tl.store(dw_ptrs, round_to(acc, dw_ptr.dtype.element_ty, INTERPRETED), mask=n_valid[:, None] & k_valid[None, :])
    if HAS_BIAS_GRAD:
        if not A_GATHERED:
            # The 16 columns are equal: keep column 0 (a select, so a NaN propagates as it is).
            bias_acc = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, acc_db, 0.0), axis=1)
        if pid_k == 0:
            tl.store(db_ptr + split.to(tl.int64) * stride_dbs + expert * stride_dbe + offs_n * stride_dbn,
                     round_to(bias_acc, db_ptr.dtype.element_ty, INTERPRETED), mask=n_valid)


@triton.jit
def split_sum_kernel(partial_ptr, dw_ptr, db_ptr, dw_numel, numel, stride_split, SPLIT: tl.constexpr,
                     BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """[dW | db] flat, element i = the sum over s = 0 .. SPLIT-1, in that order, of partial[s, i],
    rounded once; i < dw_numel goes to dW (contiguous), the rest to db."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    total = tl.load(partial_ptr + offs, mask=valid, other=0.0)
    for s in tl.static_range(1, SPLIT):
        total += tl.load(partial_ptr + s * stride_split + offs, mask=valid, other=0.0)
    in_dw = offs < dw_numel
    tl.store(dw_ptr + offs, round_to(total, dw_ptr.dtype.element_ty, INTERPRETED), mask=valid & in_dw)
    tl.store(db_ptr + (offs - dw_numel), round_to(total, db_ptr.dtype.element_ty, INTERPRETED),
             mask=valid & ~in_dw)


SPLIT_SUM_BLOCK = 1024


def backward_dw(a, b, routing_weights, sorted_ids_padded, padded_offsets, weight_like, n_axis: int, k_axis: int,
                *, num_pairs: int, top_k: int, a_gathered: bool, b_gathered: bool, bias_grad: bool,
                config: KernelConfig):
    """(dW shaped like weight_like, with its axis n_axis = N = a.shape[1] and k_axis = Kd = b.shape[1];
    db [E, N] or None)."""
    require_runnable(backward_dw_kernel, a.device)
    num_experts = weight_like.shape[0]
    out_size, depth = a.shape[1], b.shape[1]
    assert weight_like.shape[n_axis] == out_size and weight_like.shape[k_axis] == depth
    split = config.SPLIT
    dw = torch.empty(weight_like.shape, dtype=weight_like.dtype, device=a.device)
    db = torch.empty(num_experts, out_size, dtype=weight_like.dtype, device=a.device) if bias_grad else None
    if split > 1:
        # fp32 (fp64 for fp64) partials: slot s holds [dW (contiguous) | db] of chunk s, so that
        # one elementwise launch reduces both.
        dw_numel, db_numel = dw.numel(), (db.numel() if bias_grad else 0)
        partial_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        partial = torch.empty(split, dw_numel + db_numel, dtype=partial_dtype, device=a.device)
        dw_out = partial[:, :dw_numel].view(split, *weight_like.shape)
        db_out = partial[:, dw_numel:].view(split, num_experts, out_size) if bias_grad else dw_out
    else:
        dw_out = dw.unsqueeze(0)
        db_out = db.unsqueeze(0) if bias_grad else dw_out  # never written when HAS_BIAS_GRAD is False
    weight_arg = routing_weights.reshape(-1) if a_gathered else dw
    assert weight_arg.is_contiguous() or not a_gathered
    # 1-D: slot-major, the tiles of one slot consecutive (the kernel decodes pid in this order).
    grid = (num_experts * split * tile_grid_size(triton.cdiv(out_size, config.BLOCK_N),
                                                 triton.cdiv(depth, config.BLOCK_K)),)
    backward_dw_kernel[grid](
        a, b, weight_arg, sorted_ids_padded, padded_offsets, dw_out, db_out,
        num_pairs, top_k, out_size, depth, readable_width(a, 1, out_size), readable_width(b, 1, depth),
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        dw_out.stride(0), dw_out.stride(1), dw_out.stride(1 + n_axis), dw_out.stride(1 + k_axis),
        db_out.stride(0), db_out.stride(1), db_out.stride(2),
        **config.meta(), GROUP_M=config.GROUP_M, SPLIT=split, A_GATHERED=a_gathered, B_GATHERED=b_gathered, HAS_BIAS_GRAD=bias_grad,
        **dot_flags(a.dtype), num_warps=config.num_warps, num_stages=config.num_stages)
    if split > 1:
        numel = partial.shape[1]
        split_sum_kernel[(triton.cdiv(numel, SPLIT_SUM_BLOCK),)](
            partial, dw, db if bias_grad else dw, dw_numel, numel, partial.stride(0), SPLIT=split,
            BLOCK=SPLIT_SUM_BLOCK, INTERPRETED=dot_flags(a.dtype)["INTERPRETED"], num_warps=4)
    return dw, db
