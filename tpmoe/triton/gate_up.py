"""Forward gate_up kernel: h = act(x W_g^T + b_g) * (x W_u^T + b_u) for the rows of one expert.

Grid: one program per (row block of one expert, column block of I_p) tile, on a 1-D grid in
grouped order (`tpmoe.triton.grid.grouped_tile`): GROUP_M row blocks walk down one column
stripe of W before the next stripe starts, so the stripe and the group's gathered x rows stay
in L2. Row blocks of padding (block_expert = -1) exit at once.

Tile: the x rows are gathered through the sorted pair ids inside the A-load (no permuted copy
of x). The gate and up columns of one column block are loaded as ONE [BLOCK_K, 2 BLOCK_N] B
tile, gate and up alternating (column 2j is gate j, 2j+1 its up partner), whatever the
layout: concatenated reads rows j and j + I, interleaved and gpt_oss the adjacent rows 2j,
2j+1 (one contiguous run where the R axis is contiguous). So each k-step is one tl.dot into
one [BLOCK_M, 2 BLOCK_N] accumulator: BLOCK_N = 64 is one n = 128 wgmma (two n = 64 before),
the 128-row prefill config's BLOCK_N = 128 an n = 256 one. The epilogue adds the bias in the
same column order, splits the accumulator into gate and up (reshape to [BM, BN, 2] and
tl.split), applies the activation, and stores h, so the [S, 2 I_p] pre-activation never
reaches memory. Not gated: the B tile is [BLOCK_K, BLOCK_N] of the I_p rows.

h is allocated with 16-byte aligned rows (`layouts.empty_aligned_rows`) and this kernel stores
zeros into their padding columns: an uneven shard (I_p = 154, 77) keeps the down kernel's
16-byte asynchronous loads of h, which mask by the padded width (down.grouped_scatter). The
gpt_oss weight tile (gate/up rows along the contiguous axis) masks by R's padded width likewise
where the weight has that padding in memory (`layouts.readable_width`).
"""
import torch
import triton
import triton.language as tl

from .activations import gated_forward, unary_activation_and_grad
from .dequant import dequantized_dot, fp8_activation_dot, weight_arguments
from .grid import grouped_tile, tile_grid_size
from .interpret import as_dot_operand, dot_flags, require_runnable, round_to, zeros_accumulator
from .layouts import empty_aligned_rows, gate_up_axes, gate_up_columns, readable_width
from .tile_configs import KernelConfig


@triton.jit
def gate_up_kernel(
    # pointers
    x_ptr,             # [T, H] hidden states
    w_ptr,             # w_gate_up: expert e, row r, hidden h at e*stride_we + r*stride_wr + h*stride_wh
    bias_ptr,          # [E, R] b_gate_up, packed like the rows of w (read only if HAS_BIAS)
    sorted_ids_ptr,    # [M] int32 pair ids p = t*K + k in padded sorted order; sentinel num_pairs
    block_expert_ptr,  # [cdiv(M, BLOCK_M)] int32 expert of each row block, -1 past the used rows
    h_ptr,             # [M, I] out: the activation, rows in padded sorted order
    # sizes
    num_pairs, top_k, hidden_size, intermediate_size,
    w_rows_bound,      # COL_STEP 2 or not gated: rows of w loaded below this (R, or R padded: `readable_width`)
    h_width,           # columns of h stored: I, or its padded width (zeros stored there)
    num_row_blocks,    # len(block_expert)
    up_offset,         # row of up column j = j * COL_STEP + up_offset
    alpha, limit,      # clamped_swiglu parameters
    # strides
    stride_xt, stride_xh,
    stride_we, stride_wr, stride_wh,
    stride_be, stride_br,
    stride_hm, stride_hi,
    # quantized w (tpmoe.triton.dequant; not read when dense): its scales, the shard's first
    # intermediate column inside its fp8 scale block, the scales' strides (expert, gate/up half,
    # column, block of H)
    scale_ptr, block_offset, stride_se, stride_sg, stride_sn, stride_sk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    COL_STEP: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr, SCALE_BLOCK: tl.constexpr, SCALE_SPAN: tl.constexpr,  # tpmoe.triton.dequant
    ACT_FP8: tl.constexpr,  # fp8_block only: x quantized per row and scale block, fp8 x fp8 dots (dequant)
):
    num_col_blocks = tl.cdiv(intermediate_size, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_row_blocks, num_col_blocks, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # padding blocks past num_padded (zero-token experts own no block)
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_valid = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    # Columns of the B tile: gated, column c is intermediate column j = c // 2, gate (c even)
    # or up (c odd); its row of w is j * COL_STEP + (c % 2) * up_offset.
    if GATED:
        offs_c = tl.arange(0, 2 * BLOCK_N)
        offs_j = pid_n * BLOCK_N + offs_c // 2
        if COL_STEP == 2:  # interleaved / gpt_oss: rows 2j, 2j+1, written so that contiguity is visible
            w_rows = pid_n * 2 * BLOCK_N + offs_c
        else:              # concatenated: rows j and j + I
            w_rows = offs_j + (offs_c % 2) * up_offset
    else:
        offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = offs_j
    w_col_valid = offs_j < intermediate_size
    if COL_STEP == 2 or not GATED:
        # The tile's rows run along R: masked by R's padded width where w has that padding in
        # memory, a multiple of 16 (16-byte copies on the contiguous R axis of gpt_oss). Columns
        # j >= I then hold finite padding products, and h is forced to zero there below.
        w_load_valid = w_rows < w_rows_bound
    else:
        w_load_valid = w_col_valid  # concatenated: R is not the contiguous axis, the exact mask costs nothing
    w_rows = w_rows.to(tl.int64)
    # Quantized w: each column's offset into the scales (tpmoe.triton.dequant).
    if WEIGHT_FORMAT == "mxfp4":  # a scale per row and 32-block of H
        scale_cols = w_rows * stride_sn
    elif WEIGHT_FORMAT == "fp8_block":  # the scale block of the intermediate column, in its gate/up half
        scale_cols = ((block_offset + offs_j) // SCALE_BLOCK).to(tl.int64) * stride_sn
        if GATED:
            scale_cols += (offs_c % 2) * stride_sg

    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
    w_ptrs = w_ptr + expert * stride_we + w_rows[None, :] * stride_wr + offs_k[:, None] * stride_wh
    acc = zeros_accumulator(BLOCK_M, 2 * BLOCK_N if GATED else BLOCK_N, ACC_FP64)
    for k0 in range(0, hidden_size, BLOCK_K):
        k_valid = offs_k < hidden_size - k0
        x_tile = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        if ACT_FP8:  # BLOCK_K = SCALE_BLOCK: k-step k0 // BLOCK_K is one scale block of H
            acc = fp8_activation_dot(x_tile, acc, w_ptr + expert * stride_we, w_rows * stride_wr, k0, stride_wh,
                                     scale_ptr + expert * stride_se, scale_cols, k0 // BLOCK_K, stride_sk, k_valid,
                                     w_load_valid, BLOCK_K, INTERPRETED)
        elif WEIGHT_FORMAT == "dense":
            w_tile = tl.load(w_ptrs, mask=k_valid[:, None] & w_load_valid[None, :], other=0.0)
            acc = tl.dot(as_dot_operand(x_tile, INTERPRETED), as_dot_operand(w_tile, INTERPRETED), acc,
                         input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        else:
            acc = dequantized_dot(x_tile, acc, w_ptr + expert * stride_we, w_rows * stride_wr, k0, stride_wh,
                                  scale_ptr + expert * stride_se, scale_cols, k0, stride_sk, hidden_size - k0,
                                  w_load_valid, BLOCK_K, SCALE_BLOCK, SCALE_SPAN, WEIGHT_FORMAT,
                                  x_ptr.dtype.element_ty, INTERPRETED, DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        w_ptrs += BLOCK_K * stride_wh

    if HAS_BIAS:  # the bias rows in the accumulator's column order
        bias = tl.load(bias_ptr + expert * stride_be + w_rows * stride_br, mask=w_col_valid, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    if GATED:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
        h = gated_forward(gate, up, alpha, limit, ACTIVATION)
    else:
        h, _ = unary_activation_and_grad(acc, ACTIVATION)
    # Padding rows are stored as zeros: the weight-gradient kernels multiply them by zero and
    # must not meet garbage (NaN * 0 is NaN). So are the padding columns I .. h_width: the down
    # kernel reduces over them (masked by the padded width) and needs exact zeros there.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.where(row_valid[:, None] & (offs_n < intermediate_size)[None, :], h, 0.0)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hi
    tl.store(h_ptrs, round_to(h, h_ptr.dtype.element_ty, INTERPRETED), mask=(offs_n < h_width)[None, :])


def gate_up(hidden_states, w_gate_up, b_gate_up, sorted_ids_padded, block_expert, *, top_k: int,
            activation: str, layout: str, gated: bool, alpha: float, limit: float,
            config: KernelConfig, scale=None, weight_format: str = "dense", block_size: int = 1,
            block_offset: int = 0, fp8_activations: bool = False) -> torch.Tensor:
    """h [M, I] (M = len(sorted_ids_padded)) in padded sorted order, rows 16-byte aligned
    (row stride `layouts.aligned_row_stride(I)`); padding rows are zero, and so are the padding
    columns I .. aligned_row_stride(I) of every row (in memory, past the view).

    Quantized w_gate_up (weight_format "fp8_block" or "mxfp4", layouts concatenated and
    interleaved): `scale` is its BlockScales.gate_up, block_size and block_offset BlockScales';
    the tiles are dequantized in the B-load (tpmoe.triton.dequant). fp8_activations (fp8_block,
    config.BLOCK_K = block_size): x is quantized per row and scale block in registers and each
    k-step is an fp8 x fp8 dot (dequant.fp8_activation_dot); h then sits block_offset columns into
    its aligned rows (`h_buffer`), and no padding column is stored."""
    require_runnable(gate_up_kernel, hidden_states.device)
    num_tokens, hidden_size = hidden_states.shape
    rows_axis, hidden_axis = gate_up_axes(layout)
    intermediate_size = w_gate_up.shape[rows_axis] // (2 if gated else 1)
    col_step, up_offset = gate_up_columns(layout, gated, intermediate_size)
    num_rows = sorted_ids_padded.shape[0]
    num_row_blocks = block_expert.shape[0]
    assert num_row_blocks * config.BLOCK_M >= num_rows, "block_expert does not cover sorted_ids_padded"
    shift = block_offset if fp8_activations else 0
    h = h_buffer(num_rows, intermediate_size, hidden_states.dtype, hidden_states.device, shift)
    bias = b_gate_up if b_gate_up is not None else h  # never read when HAS_BIAS is False
    w_gate_up, scale_arguments = weight_arguments(w_gate_up, scale, weight_format, "gate_up", block_size,
                                                  block_offset, config.BLOCK_K, h, fp8_activations)
    grid = (tile_grid_size(num_row_blocks, triton.cdiv(intermediate_size, config.BLOCK_N)),)
    gate_up_kernel[grid](
        hidden_states, w_gate_up, bias, sorted_ids_padded, block_expert, h,
        num_tokens * top_k, top_k, hidden_size, intermediate_size,
        readable_width(w_gate_up, rows_axis, w_gate_up.shape[rows_axis]),
        intermediate_size if shift else readable_width(h, 1, intermediate_size),
        num_row_blocks, up_offset, alpha, limit,
        hidden_states.stride(0), hidden_states.stride(1),
        w_gate_up.stride(0), w_gate_up.stride(rows_axis), w_gate_up.stride(hidden_axis),
        bias.stride(0), bias.stride(1),
        h.stride(0), h.stride(1),
        **config.meta(), GROUP_M=config.GROUP_M, COL_STEP=col_step, GATED=gated, HAS_BIAS=b_gate_up is not None,
        ACTIVATION=activation, **dot_flags(hidden_states.dtype), **scale_arguments, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return h


def h_buffer(num_rows: int, intermediate_size: int, dtype, device, shift: int = 0) -> torch.Tensor:
    """h's [M, I] view, rows 16-byte aligned (`layouts.empty_aligned_rows`). shift (the fp8 x fp8
    variant's block_offset): h's column c at column shift + c of rows of shift + I, so that the
    down kernel's k-steps, which follow the scale blocks (block_offset + c) // B, start on aligned
    columns and keep their 16-byte async copies (`down.grouped_scatter` reads the whole rows)."""
    return empty_aligned_rows(num_rows, shift + intermediate_size, dtype, device)[:, shift:]
