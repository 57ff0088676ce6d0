"""Grouped "rows times expert weight, scattered to pair rows" kernel: the forward down
projection, and (with other operands) the backward dx.

Forward:  out[s, p] = topk_weight[p] * (h[row] @ W_down[e][:, I_s]^T (+ b_down[e] if s == 0))
dx:       out[s, p] = d_preact[row][R_s] @ W_gate_up[e][R_s]          (no bias, no weight)
Rows come in padded sorted order; each pair p owns one output row per split s, so the sum
over splits and k slots afterwards is a plain deterministic reduction in a fixed order
(`tpmoe.triton.combine`, one launch), with no atomics.

Grid: one program per (row block, column block of N) tile on a 1-D axis in grouped order
(`tpmoe.triton.grid.grouped_tile`, GROUP_M row blocks down one column stripe of W before the
next), times SPLIT on the second axis. Row blocks of padding (block_expert = -1) exit at once.

Split (SPLIT > 1, the decode configs): program s reduces only its slice of the Kdim axis (I_p
for the forward, R for dx), a whole number of BLOCK_K steps, and writes the partial
out[s]. At T = 1 on Qwen3-30B-A3B (8 row blocks, N = H = 2048) this multiplies the programs
streaming W_down (the decode's only real traffic) by SPLIT; the partials are
SPLIT * T*K * H fp32, a few hundred KB against the 25 MB of weights. A split whose slice is
empty still writes its (zero, or bias-only) partial, so the buffer needs no zero fill.

Tile: one [BLOCK_M, BLOCK_N] accumulator; 128 x 256 for the 128-row prefill config (two
n = 256 wgmma per k-step, 8 warps), 64 x 128 mid-size, 16-row ones for decode (mma.sync).

Pair rows dtype (`pair_dtype`): for fp16/bf16 inputs without a split, the input dtype, each
row rounded once from the fp32 accumulator, which halves the traffic of the [T*K, H] buffer
(at T = 16384, K = 8, H = 2048: 0.5 GB written and read instead of 1 GB, next to 1.2 GB of
weights). That is the rounding the reference itself makes (tpmoe.reference rounds each
expert's output rows to bf16 and sums them in fp32), so the bf16 accuracy bound (twice a
same-dtype PyTorch run, tests/ops/test_triton_fused.py) keeps its margin: over its cases x 3
seeds the worst ratio stayed 1.41 of the bound's 2, as with fp32 rows (individual cases moved
either way). With SPLIT > 1 (decode, where the buffer is small) the partials stay fp32: a
pair split in S rounded pieces would add roundings the reference does not make. fp32 and
fp64 inputs: fp32 / fp64 rows.
"""
import torch
import triton
import triton.language as tl

from .dequant import dequantized_dot, fp8_activation_dot, weight_arguments
from .grid import grouped_tile, tile_grid_size
from .interpret import as_dot_operand, dot_flags, require_runnable, round_to, zeros_accumulator
from .layouts import readable_width
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
    out_ptr,             # [SPLIT, num_pairs, N] out: one row per (token, k) pair per split
    # sizes
    num_pairs, N,
    Kdim,                # the reduction depth
    Kdim_a,              # loop and A mask bound: Kdim, or its padded width (rows hold zeros there)
    num_row_blocks,      # len(block_expert)
    k_per_split,         # Kdim columns each split reduces (a multiple of BLOCK_K)
    # strides
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_be, stride_bn,
    stride_os, stride_op, stride_on,
    # quantized W (the forward's W_down; tpmoe.triton.dequant; not read when dense): its scales,
    # the shard's first Kdim column inside its scale block, the scales' strides (expert, column,
    # block of Kdim)
    scale_ptr, block_offset, stride_se, stride_sn, stride_sk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE_BY_WEIGHT: tl.constexpr,
    W_MASK_EXACT: tl.constexpr,  # W's k entries masked by Kdim (else by Kdim_a, like A's)
    INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr, SCALE_BLOCK: tl.constexpr, SCALE_SPAN: tl.constexpr,  # tpmoe.triton.dequant
    ACT_FP8: tl.constexpr,  # fp8_block, SPLIT 1: rows quantized per scale block, fp8 x fp8 dots (dequant)
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_row_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    split = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # padding blocks past num_padded
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_valid = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = offs_n < N
    k_start = split * k_per_split
    # Kdim_a: a multiple of 16 where the launcher found padding in memory, so that a mask on a
    # contiguous axis stays 16-byte uniform (launcher: `grouped_scatter`). One bound for both
    # operands unless W must keep the exact one (a second bound cost the fp32 config a spill).
    k_end = tl.minimum(k_start + k_per_split, Kdim_a)
    if W_MASK_EXACT:
        k_end_w = tl.minimum(k_start + k_per_split, Kdim)
    else:
        k_end_w = k_end
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = (a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
              + (k_start + offs_k).to(tl.int64)[None, :] * stride_ak)
    w_ptrs = (w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
              + (k_start + offs_k).to(tl.int64)[:, None] * stride_wk)
    # Quantized W: each column's offset into the scales, and where Kdim column 0 sits along the
    # stored values (mxfp4 keeps a cut block whole: block_offset in) and the scale blocks.
    if WEIGHT_FORMAT == "mxfp4":  # a scale per row of W (column of the tile) and 32-block of Kdim
        scale_cols = offs_n.to(tl.int64) * stride_sn
        w_start = block_offset
    else:  # fp8_block: B x B blocks; the values hold exactly the shard's Kdim columns
        scale_cols = (offs_n // SCALE_BLOCK).to(tl.int64) * stride_sn
        w_start = 0
    acc = zeros_accumulator(BLOCK_M, BLOCK_N, ACC_FP64)
    if ACT_FP8:
        # BLOCK_K = SCALE_BLOCK, no split: step kb is scale block kb of Kdim, positions
        # kb * BLOCK_K + k counted from the block's start. a_ptr is the start of h's rows, where
        # h's column c sits at position block_offset + c (gate_up.h_buffer: the steps stay
        # 16-byte aligned); W is addressed from block_offset columns before its first one. The
        # first step is shortened by the shard's offset: masked below block_offset and from
        # block_offset + Kdim on.
        fp8_end = block_offset + Kdim
        for kb in range(0, tl.cdiv(fp8_end, BLOCK_K)):
            position = kb * BLOCK_K + offs_k
            k_valid = (position >= block_offset) & (position < fp8_end)
            a_tile = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            acc = fp8_activation_dot(a_tile, acc, w_ptr + expert * stride_we - block_offset * stride_wk,
                                     offs_n.to(tl.int64) * stride_wn, kb * BLOCK_K, stride_wk,
                                     scale_ptr + expert * stride_se, scale_cols, kb, stride_sk, k_valid, col_valid,
                                     BLOCK_K, INTERPRETED)
            a_ptrs += BLOCK_K * stride_ak
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            a_tile = tl.load(a_ptrs, mask=row_valid[:, None] & (offs_k < k_end - k0)[None, :], other=0.0)
            if WEIGHT_FORMAT == "dense":
                w_tile = tl.load(w_ptrs, mask=(offs_k < k_end_w - k0)[:, None] & col_valid[None, :], other=0.0)
                acc = tl.dot(as_dot_operand(a_tile, INTERPRETED), as_dot_operand(w_tile, INTERPRETED), acc,
                             input_precision=DOT_PRECISION, out_dtype=acc.dtype)
            else:
                acc = dequantized_dot(a_tile, acc, w_ptr + expert * stride_we, offs_n.to(tl.int64) * stride_wn,
                                      w_start + k0, stride_wk, scale_ptr + expert * stride_se, scale_cols,
                                      block_offset + k0, stride_sk, k_end_w - k0, col_valid, BLOCK_K, SCALE_BLOCK,
                                      SCALE_SPAN, WEIGHT_FORMAT, a_ptr.dtype.element_ty, INTERPRETED,
                                      DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:  # once per pair: in the first split's partial only
        if split == 0:
            bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=col_valid, other=0.0)
            acc += bias.to(acc.dtype)[None, :]
    if SCALE_BY_WEIGHT:  # w * (sum of partials) = sum of (w * partial): each split scales its own
        routing_weight = tl.load(routing_weight_ptr + pair, mask=row_valid, other=0.0)
        acc = acc * routing_weight.to(acc.dtype)[:, None]
    out_ptrs = (out_ptr + split.to(tl.int64) * stride_os + pair.to(tl.int64)[:, None] * stride_op
                + offs_n[None, :] * stride_on)
    tl.store(out_ptrs, round_to(acc, out_ptr.dtype.element_ty, INTERPRETED),
             mask=row_valid[:, None] & col_valid[None, :])


def pair_dtype(dtype: torch.dtype, split: int) -> torch.dtype:
    """The dtype of the pair rows: the input's for fp16/bf16 without a split, else fp32 (fp64)."""
    if dtype in (torch.float16, torch.bfloat16) and split == 1:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_depth(depth: int, block_k: int, split: int) -> int:
    """Kdim columns per split: whole BLOCK_K steps, so every split but the last is full."""
    steps = triton.cdiv(max(depth, 1), block_k)
    return triton.cdiv(steps, split) * block_k


def grouped_scatter(rows, weight, n_axis: int, k_axis: int, bias, routing_weights, sorted_ids_padded,
                    block_expert, *, num_pairs: int, config: KernelConfig, scale=None, weight_format: str = "dense",
                    block_size: int = 1, block_offset: int = 0, fp8_activations: bool = False) -> torch.Tensor:
    """out [SPLIT, num_pairs, N] partials in `pair_dtype`: rows @ weight[e]^T (+ bias[e])
    (* routing weight) per pair, split s over its slice of Kdim; `combine.combine` sums them.

    weight is read in place: its axis n_axis is N (the output) and k_axis is Kdim (= rows.shape[1]).
    rows may have any row stride (h comes with 16-byte aligned rows).

    Uneven Kdim (I_p = 154, 77; 2 I_p for dx): where rows' stride leaves the padding columns up
    to `aligned_row_stride(Kdim)` in memory, they MUST hold zeros (gate_up writes them into h,
    backward_dh into d_preact) and are read as such: the loads of rows are masked by the padded
    width (a multiple of 16: 16-byte async copies kept). The weight's k entries are masked by
    its padded width too where it has one in memory along a contiguous k axis (aligned_storage's
    zeros, or a larger tensor's finite values: times the zeros of rows, nothing), else exactly.
    Rows without such padding (a compact user tensor) get the exact mask, and then the weight's
    padding meets zeros from the mask. Either way no padding value reaches the result.

    Quantized weight (the forward's w_down in weight_format "fp8_block" or "mxfp4"): `scale` is
    its BlockScales.down, block_size and block_offset BlockScales'; the tiles are dequantized in
    the B-load (tpmoe.triton.dequant), their Kdim entries masked exactly (mxfp4's last block
    holds the next shard's values past I_p). fp8_activations (fp8_block, config.BLOCK_K =
    block_size, SPLIT 1): the rows are quantized per row and scale block in registers and each
    k-step is an fp8 x fp8 dot (dequant.fp8_activation_dot); where block_offset > 0, rows must
    be gate_up's h_buffer(..., shift=block_offset) (read from its rows' start).
    """
    require_runnable(grouped_scatter_kernel, rows.device)
    num_rows, depth = rows.shape
    out_size = weight.shape[n_axis]
    assert weight_format != "dense" or weight.shape[k_axis] == depth, (
        f"weight axis {k_axis} is {weight.shape[k_axis]}, rows have {depth}")
    num_row_blocks = block_expert.shape[0]
    assert num_row_blocks * config.BLOCK_M >= num_rows, "block_expert does not cover sorted_ids_padded"
    out = torch.empty(config.SPLIT, num_pairs, out_size, dtype=pair_dtype(rows.dtype, config.SPLIT),
                      device=rows.device)
    bias_arg = bias if bias is not None else out  # never read when HAS_BIAS is False
    weight_arg = routing_weights.reshape(-1) if routing_weights is not None else out
    assert routing_weights is None or weight_arg.is_contiguous()
    grid = (tile_grid_size(num_row_blocks, triton.cdiv(out_size, config.BLOCK_N)), config.SPLIT)
    # Padded depth for rows whose padding is in memory (zeros: the docstring), and for the weight
    # too where it has its own there; the weight's wide mask is only useful beside rows' one.
    depth_a = readable_width(rows, 1, depth)
    depth_w = readable_width(weight, k_axis, depth) if depth_a > depth and weight_format == "dense" else depth
    weight, scale_arguments = weight_arguments(weight, scale, weight_format, "down", block_size, block_offset,
                                               config.BLOCK_K, out, fp8_activations)
    assert not fp8_activations or config.SPLIT == 1, "the fp8 x fp8 down launch does not split"
    if fp8_activations and block_offset:  # the whole rows of gate_up.h_buffer: column c at block_offset + c
        assert rows.storage_offset() >= block_offset and rows.stride(1) == 1, "rows must come from gate_up.h_buffer"
        rows = rows.as_strided((num_rows, block_offset + depth), rows.stride(), rows.storage_offset() - block_offset)
    grouped_scatter_kernel[grid](
        rows, weight, bias_arg, weight_arg, sorted_ids_padded, block_expert, out,
        num_pairs, out_size, depth, depth_a,
        num_row_blocks, split_depth(depth, config.BLOCK_K, config.SPLIT),
        rows.stride(0), rows.stride(1),
        weight.stride(0), weight.stride(n_axis), weight.stride(k_axis),
        bias_arg.stride(0), bias_arg.stride(-1),
        out.stride(0), out.stride(1), out.stride(2),
        **config.meta(), GROUP_M=config.GROUP_M, HAS_BIAS=bias is not None,
        SCALE_BY_WEIGHT=routing_weights is not None, W_MASK_EXACT=depth_w != depth_a,
        **dot_flags(rows.dtype), **scale_arguments, num_warps=config.num_warps, num_stages=config.num_stages)
    return out
