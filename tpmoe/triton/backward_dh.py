"""Backward through the activation: d_preact = act'(.) * (topk_weight * dy[token] @ W_down[e]).

Saved vs recomputed: the forward saves h [S, I_p] (it is needed anyway: dW_down = (w dy)^T h)
and recomputes the gate/up pre-activation [S, 2 I_p] here rather than saving it. Saving it
would put 2x h's memory per layer on the autograd tape, for training; recomputing costs the
gate_up GEMM again, but it shares this kernel's loop over H with the dh GEMM (the same
gathered token rows, the same trip count), so it adds MMA work and one more weight stream,
not a pass over the activations.

Gate and up are recomputed by ONE dot (gated, half precision: `one_gate_up_dot`): the weight
tile is [BLOCK_K, 2 BLOCK_N] with the gate and up rows of each intermediate column side by side
(tile column c is intermediate column pid_n*BLOCK_N + c // 2, its gate row if c is even, up if
odd), so the accumulator [BLOCK_M, 2 BLOCK_N] splits into gate and up in the epilogue (reshape
to [.., BLOCK_N, 2] + split). One wider MMA (wgmma m64n128 at BLOCK_N = 64 on sm_90) instead of
two narrow ones, and for gpt_oss storage (gate/up rows alternating along the contiguous axis)
one contiguous, vectorised load. fp32 / fp64 keep two dots (their FMA dots spill otherwise).

Grid: 1-D, cdiv(M, BLOCK_M) row blocks x cdiv(I_p, BLOCK_N) column blocks in grouped order
(`grouped_program`, vLLM / Triton-tutorial style: GROUP_M row blocks walk every column block
before the next group starts), so that the gathered dy/x rows of a group and the weight stripe
of a column block are re-read while still in L2 (not yet timed on a GPU). Padding row blocks
(block_expert = -1) exit at once.

Also here, with no extra GEMM: d topk_weights[t, k] = dy_t . o_{t,k} (o without the weight)
= (dy_t @ W_down[e]) . h + dy_t . b_down[e]. Each column block writes its partial sum of
the first term for its pairs ([n_blocks, T*K]); the launcher sums those in a fixed order.

Offsets: row, pair and column indices are int32 (align bounds M and T*K below 2^31); every
product of an index with a stride that can pass 2^31 (expert * stride, row * stride, column
block * T*K for d topk_weights) is taken in int64 (`wide_offset`).
"""
import torch
import triton
import triton.language as tl

from .activations import gated_backward, unary_activation_and_grad
from .interpret import as_dot_operand, dot_flags, require_runnable, round_to, zeros_accumulator
from .layouts import down_axes, empty_aligned_rows, gate_up_axes, gate_up_columns, readable_width
from .tile_configs import KernelConfig


@triton.jit
def wide_offset(index, stride):
    """index * stride in int64: the product of an int32 index and an int32 stride wraps past 2^31."""
    return index.to(tl.int64) * stride


@triton.jit
def grouped_program(pid, num_row_blocks, num_col_blocks, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid` in grouped order: GROUP_M row blocks (fewer in
    the last group) take column block 0, then column block 1, ... before the next group."""
    programs_per_group = GROUP_M * num_col_blocks
    group = pid // programs_per_group
    first_row_block = group * GROUP_M
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_M)
    in_group = pid % programs_per_group
    return first_row_block + in_group % group_rows, in_group // group_rows


@triton.jit
def backward_dh_kernel(
    # pointers
    dy_ptr,                # [T, H] gradient of the block output
    x_ptr,                 # [T, H] hidden states (to recompute gate/up)
    w_gate_up_ptr,         # expert e, row r, hidden h at e*stride_gue + r*stride_gur + h*stride_guh
    b_gate_up_ptr,         # [E, R] (read only if HAS_GATE_UP_BIAS)
    w_down_ptr,            # expert e, hidden h, column i at e*stride_de + h*stride_dh + i*stride_di
    b_down_ptr,            # [E, H] (read only if HAS_DOWN_BIAS)
    routing_weight_ptr,    # [num_pairs] flat topk_weights
    h_ptr,                 # [M, I] the forward's activation, padded sorted order
    sorted_ids_ptr,        # [M] int32 pair ids; sentinel num_pairs
    block_expert_ptr,      # [cdiv(M, BLOCK_M)] int32, -1 past the used rows
    d_preact_ptr,          # [M, R] out: gradient of the gate_up pre-activation, columns packed like R
    d_weight_partial_ptr,  # [cdiv(I, BLOCK_N), num_pairs] out: partial dy . o per column block
    # sizes
    num_pairs, top_k, hidden_size, intermediate_size, up_offset, alpha, limit,
    w_down_cols_bound,     # W_down's columns loaded below this: I, or I padded (`layouts.readable_width`)
    gu_rows_bound,         # ONE_GU_DOT, COL_STEP 2: w_gate_up rows loaded below this (R, or R padded)
    d_preact_cols,         # R: the logical columns of d_preact
    d_preact_width,        # R, or its padded width: the last column block stores zeros in between
    num_row_blocks, num_col_blocks,
    # strides
    stride_dyt, stride_dyh,
    stride_xt, stride_xh,
    stride_gue, stride_gur, stride_guh,
    stride_gbe, stride_gbr,
    stride_de, stride_dh, stride_di,
    stride_dbe, stride_dbh,
    stride_hm, stride_hi,
    stride_pm, stride_pr,
    stride_wpb, stride_wpp,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    COL_STEP: tl.constexpr, GATED: tl.constexpr, HAS_GATE_UP_BIAS: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    ONE_GU_DOT: tl.constexpr,  # gated, half precision: gate and up recomputed by one [BK, 2 BN] dot
):
    pid_m, pid_n = grouped_program(tl.program_id(0), num_row_blocks, num_col_blocks, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # padding blocks past num_padded
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_valid = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = offs_n < intermediate_size
    gate_rows = offs_n.to(tl.int64) * COL_STEP
    offs_k = tl.arange(0, BLOCK_K)

    dy_ptrs = dy_ptr + token[:, None] * stride_dyt + offs_k[None, :] * stride_dyh
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
    # W_down's columns are this tile's output columns (not reduced): masked by the padded width
    # where W_down has it in memory (16-byte copies along a contiguous I axis), the extra columns
    # of acc_dh are finite and never stored (col_valid below) nor summed (h_saved is 0 there).
    w_down_valid = offs_n < w_down_cols_bound
    w_down_ptrs = (w_down_ptr + expert * stride_de + offs_k[:, None] * stride_dh
                   + wide_offset(offs_n, stride_di)[None, :])
    w_expert = w_gate_up_ptr + expert * stride_gue
    if ONE_GU_DOT:
        # The recomputed gate/up weight tile: [BLOCK_K, 2 BLOCK_N] rows of w_gate_up, tile column c
        # holding intermediate column pid_n*BLOCK_N + c // 2, its gate row if c is even, up if odd.
        offs_gu = tl.arange(0, 2 * BLOCK_N)
        if COL_STEP == 2:  # interleaved / gpt_oss: gate j at row 2j, up at 2j + 1: tile column c is row 2*j0 + c
            gu_rows = (pid_n * 2 * BLOCK_N + offs_gu).to(tl.int64)
        else:              # concatenated: gate j at row j, up at j + up_offset (= I)
            gu_rows = (pid_n * BLOCK_N + offs_gu // 2).to(tl.int64) + (offs_gu % 2) * up_offset
        if COL_STEP == 2:  # along w's R axis (contiguous for gpt_oss): the padded bound, as W_down's
            gu_valid = gu_rows < gu_rows_bound
        else:
            gu_valid = pid_n * BLOCK_N + offs_gu // 2 < intermediate_size
        w_gu_ptrs = w_expert + gu_rows[None, :] * stride_gur + offs_k[:, None] * stride_guh
        acc_gu = zeros_accumulator(BLOCK_M, 2 * BLOCK_N, ACC_FP64)  # x @ [W_gate | W_up]^T, pairs side by side
    else:
        w_gate_ptrs = w_expert + gate_rows[None, :] * stride_gur + offs_k[:, None] * stride_guh
        acc_gate = zeros_accumulator(BLOCK_M, BLOCK_N, ACC_FP64)    # recomputed x @ W_gate^T
        if GATED:
            w_up_ptrs = w_gate_ptrs + up_offset * stride_gur
            acc_up = zeros_accumulator(BLOCK_M, BLOCK_N, ACC_FP64)  # recomputed x @ W_up^T
    b_down_ptrs = b_down_ptr + expert * stride_dbe + offs_k * stride_dbh
    acc_dh = zeros_accumulator(BLOCK_M, BLOCK_N, ACC_FP64)  # dy[token] @ W_down[e][:, cols]
    if HAS_DOWN_BIAS:
        bias_dot = tl.sum(acc_dh, axis=1)  # dy_t . b_down[e], zeros to start
    for k0 in range(0, hidden_size, BLOCK_K):
        k_valid = offs_k < hidden_size - k0
        row_mask = row_valid[:, None] & k_valid[None, :]
        dy_tile = tl.load(dy_ptrs, mask=row_mask, other=0.0)
        w_down_tile = tl.load(w_down_ptrs, mask=k_valid[:, None] & w_down_valid[None, :], other=0.0)
        acc_dh = tl.dot(as_dot_operand(dy_tile, INTERPRETED), as_dot_operand(w_down_tile, INTERPRETED), acc_dh,
                        input_precision=DOT_PRECISION, out_dtype=acc_dh.dtype)
        x_tile = as_dot_operand(tl.load(x_ptrs, mask=row_mask, other=0.0), INTERPRETED)
        if ONE_GU_DOT:
            w_gu = tl.load(w_gu_ptrs, mask=k_valid[:, None] & gu_valid[None, :], other=0.0)
            acc_gu = tl.dot(x_tile, as_dot_operand(w_gu, INTERPRETED), acc_gu,
                            input_precision=DOT_PRECISION, out_dtype=acc_gu.dtype)
            w_gu_ptrs += BLOCK_K * stride_guh
        else:
            w_mask = k_valid[:, None] & col_valid[None, :]
            w_gate = tl.load(w_gate_ptrs, mask=w_mask, other=0.0)
            acc_gate = tl.dot(x_tile, as_dot_operand(w_gate, INTERPRETED), acc_gate,
                              input_precision=DOT_PRECISION, out_dtype=acc_gate.dtype)
            w_gate_ptrs += BLOCK_K * stride_guh
            if GATED:
                w_up = tl.load(w_up_ptrs, mask=w_mask, other=0.0)
                acc_up = tl.dot(x_tile, as_dot_operand(w_up, INTERPRETED), acc_up,
                                input_precision=DOT_PRECISION, out_dtype=acc_up.dtype)
                w_up_ptrs += BLOCK_K * stride_guh
        if HAS_DOWN_BIAS:
            b_down = tl.load(b_down_ptrs, mask=k_valid, other=0.0).to(acc_dh.dtype)
            bias_dot += tl.sum(dy_tile.to(acc_dh.dtype) * b_down[None, :], axis=1)
            b_down_ptrs += BLOCK_K * stride_dbh
        dy_ptrs += BLOCK_K * stride_dyh
        x_ptrs += BLOCK_K * stride_xh
        w_down_ptrs += BLOCK_K * stride_dh

    # d topk_weights partial: (dy @ W_down[e]) . h over this column block (+ the bias term once).
    h_ptrs = h_ptr + wide_offset(offs_m, stride_hm)[:, None] + offs_n[None, :] * stride_hi
    h_saved = tl.load(h_ptrs, mask=col_valid[None, :], other=0.0).to(acc_dh.dtype)
    weight_partial = tl.sum(acc_dh * h_saved, axis=1)
    if HAS_DOWN_BIAS:
        weight_partial += tl.where(pid_n == 0, bias_dot, 0.0)
    # pid_n * stride_wpb (= T*K) passes 2^31 once cdiv(I_p, BLOCK_N) * T * K does: int64.
    tl.store(d_weight_partial_ptr + wide_offset(pid_n, stride_wpb) + wide_offset(pair, stride_wpp),
             round_to(weight_partial, d_weight_partial_ptr.dtype.element_ty, INTERPRETED), mask=row_valid)

    routing_weight = tl.load(routing_weight_ptr + pair, mask=row_valid, other=0.0).to(acc_dh.dtype)
    dh = acc_dh * routing_weight[:, None]  # zero on padding rows
    if ONE_GU_DOT:
        acc_gate, acc_up = tl.split(tl.reshape(acc_gu, (BLOCK_M, BLOCK_N, 2)))
    if HAS_GATE_UP_BIAS:
        b_expert = b_gate_up_ptr + expert * stride_gbe
        acc_gate += tl.load(b_expert + gate_rows * stride_gbr, mask=col_valid, other=0.0).to(acc_gate.dtype)[None, :]
        if GATED:
            up_bias = tl.load(b_expert + (gate_rows + up_offset) * stride_gbr, mask=col_valid, other=0.0)
            acc_up += up_bias.to(acc_up.dtype)[None, :]
    d_preact_ptrs = d_preact_ptr + wide_offset(offs_m, stride_pm)[:, None] + gate_rows[None, :] * stride_pr
    if GATED:
        d_gate, d_up = gated_backward(dh, acc_gate, acc_up, alpha, limit, ACTIVATION)
        tl.store(d_preact_ptrs + up_offset * stride_pr, round_to(d_up, d_preact_ptr.dtype.element_ty, INTERPRETED),
                 mask=col_valid[None, :])
    else:
        _, act_grad = unary_activation_and_grad(acc_gate, ACTIVATION)
        d_gate = dh * act_grad
    tl.store(d_preact_ptrs, round_to(d_gate, d_preact_ptr.dtype.element_ty, INTERPRETED), mask=col_valid[None, :])
    # Zeros into d_preact's padding columns R .. d_preact_width (fewer than 16), which the dx and
    # dW_gate_up launches read through their padded-width masks: the last column block writes
    # them, whatever the layout puts in its own columns (concatenated: none of them).
    if pid_n == num_col_blocks - 1:
        pad_cols = d_preact_cols + tl.arange(0, 16)
        pad_ptrs = d_preact_ptr + wide_offset(offs_m, stride_pm)[:, None] + pad_cols.to(tl.int64)[None, :] * stride_pr
        tl.store(pad_ptrs, tl.zeros((BLOCK_M, 16), dtype=d_preact_ptr.dtype.element_ty),
                 mask=(pad_cols < d_preact_width)[None, :])


def one_gate_up_dot(gated: bool, dtype: torch.dtype) -> bool:
    """Whether gate and up are recomputed by one dot (module docstring). Half precision only: the
    fp32 / fp64 dots run on FMA units with the accumulator in registers, and splitting the
    [BLOCK_M, 2 BLOCK_N] accumulator there spilled (ptxas, sm_90 fp32: 255 registers and 20
    bytes of spills at 64x16x32), where two dots do not."""
    return gated and dtype in (torch.float16, torch.bfloat16)


def backward_dh(grad_output, hidden_states, w_gate_up, b_gate_up, w_down, b_down, topk_weights, h,
                sorted_ids_padded, block_expert, *, top_k: int, activation: str, layout: str, gated: bool,
                alpha: float, limit: float, config: KernelConfig):
    """(d_preact [M, R] packed like w_gate_up's rows, its row stride padded to 16 bytes
    (layouts.empty_aligned_rows) and zeros stored in that padding, d_topk_weights [T, K] in fp32 (fp64 for fp64))."""
    require_runnable(backward_dh_kernel, grad_output.device)
    num_tokens, hidden_size = hidden_states.shape
    num_pairs = num_tokens * top_k
    gu_rows_axis, gu_hidden_axis = gate_up_axes(layout)
    down_hidden_axis, down_inter_axis = down_axes(layout)
    gate_up_size = w_gate_up.shape[gu_rows_axis]
    intermediate_size = h.shape[1]
    col_step, up_offset = gate_up_columns(layout, gated, intermediate_size)
    num_rows = sorted_ids_padded.shape[0]
    num_row_blocks = block_expert.shape[0]
    assert num_row_blocks * config.BLOCK_M >= num_rows, "block_expert does not cover sorted_ids_padded"
    # Rows on 16-byte boundaries whatever R (uneven shards: R = 154, 308): the dx and dW
    # launches that read d_preact keep their vectorised / async loads.
    d_preact = empty_aligned_rows(num_rows, gate_up_size, hidden_states.dtype, hidden_states.device)
    num_col_blocks = triton.cdiv(intermediate_size, config.BLOCK_N)
    partial_dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    d_weight_partial = torch.empty(num_col_blocks, num_pairs, dtype=partial_dtype, device=hidden_states.device)
    routing_weights = topk_weights.reshape(-1)
    assert routing_weights.is_contiguous()
    gate_up_bias = b_gate_up if b_gate_up is not None else d_preact  # never read when absent
    down_bias = b_down if b_down is not None else d_preact
    grid = (num_row_blocks * num_col_blocks,)
    backward_dh_kernel[grid](
        grad_output, hidden_states, w_gate_up, gate_up_bias, w_down, down_bias, routing_weights, h,
        sorted_ids_padded, block_expert, d_preact, d_weight_partial,
        num_pairs, top_k, hidden_size, intermediate_size, up_offset, alpha, limit,
        readable_width(w_down, down_inter_axis, intermediate_size),
        readable_width(w_gate_up, gu_rows_axis, gate_up_size), gate_up_size,
        readable_width(d_preact, 1, gate_up_size),
        num_row_blocks, num_col_blocks,
        grad_output.stride(0), grad_output.stride(1),
        hidden_states.stride(0), hidden_states.stride(1),
        w_gate_up.stride(0), w_gate_up.stride(gu_rows_axis), w_gate_up.stride(gu_hidden_axis),
        gate_up_bias.stride(0), gate_up_bias.stride(1),
        w_down.stride(0), w_down.stride(down_hidden_axis), w_down.stride(down_inter_axis),
        down_bias.stride(0), down_bias.stride(1),
        h.stride(0), h.stride(1),
        d_preact.stride(0), d_preact.stride(1),
        d_weight_partial.stride(0), d_weight_partial.stride(1),
        **config.meta(), GROUP_M=config.GROUP_M, COL_STEP=col_step, GATED=gated,
        HAS_GATE_UP_BIAS=b_gate_up is not None, HAS_DOWN_BIAS=b_down is not None, ACTIVATION=activation,
        **dot_flags(hidden_states.dtype), ONE_GU_DOT=one_gate_up_dot(gated, hidden_states.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages)
    # A fixed-order sum over the column blocks: deterministic, no atomics.
    d_topk_weights = d_weight_partial.sum(dim=0).view(num_tokens, top_k)
    return d_preact, d_topk_weights
