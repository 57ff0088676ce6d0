"""Forward gate_up kernel: h = act(x W_g^T + b_g) * (x W_u^T + b_u) for the rows of one expert.

One program per (row block of one expert, column block of I_p). The x rows are gathered
through the sorted pair ids inside the A-load (no permuted copy of x); the gate and up
tiles of the same intermediate columns accumulate side by side and meet in the epilogue, so
the [S, 2 I_p] pre-activation never reaches memory.
"""
import torch
import triton
import triton.language as tl

from .activations import gated_forward, unary_activation_and_grad
from .interpret import as_dot_operand, dot_flags, require_runnable, round_to, zeros_accumulator
from .layouts import gate_up_axes, gate_up_columns, paired_load
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
    up_offset,         # row of up column j = j * COL_STEP + up_offset
    alpha, limit,      # clamped_swiglu parameters
    # strides
    stride_xt, stride_xh,
    stride_we, stride_wr, stride_wh,
    stride_be, stride_br,
    stride_hm, stride_hi,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COL_STEP: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    PAIRED_LOAD: tl.constexpr,  # gate/up columns adjacent and contiguous (gpt_oss): one [BK, 2 BN] load
    INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:  # padding blocks past num_padded (zero-token experts own no block)
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    row_valid = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = offs_n < intermediate_size
    gate_rows = offs_n.to(tl.int64) * COL_STEP
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
    w_expert = w_ptr + expert * stride_we
    w_gate_ptrs = w_expert + gate_rows[None, :] * stride_wr + offs_k[:, None] * stride_wh
    acc_gate = zeros_accumulator(BLOCK_M, BLOCK_N, ACC_FP64)
    if GATED:
        w_up_ptrs = w_gate_ptrs + up_offset * stride_wr
        acc_up = zeros_accumulator(BLOCK_M, BLOCK_N, ACC_FP64)
    if PAIRED_LOAD:
        offs_pair = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        w_pair_ptrs = w_expert + offs_pair.to(tl.int64)[None, :] * stride_wr + offs_k[:, None] * stride_wh
        pair_valid = offs_pair < 2 * intermediate_size
    for k0 in range(0, hidden_size, BLOCK_K):
        k_valid = offs_k < hidden_size - k0
        x_tile = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        x_tile = as_dot_operand(x_tile, INTERPRETED)
        w_mask = k_valid[:, None] & col_valid[None, :]
        if PAIRED_LOAD:
            w_pair = tl.load(w_pair_ptrs, mask=k_valid[:, None] & pair_valid[None, :], other=0.0)
            w_gate, w_up = tl.split(tl.reshape(w_pair, (BLOCK_K, BLOCK_N, 2)))
            w_pair_ptrs += BLOCK_K * stride_wh
        else:
            w_gate = tl.load(w_gate_ptrs, mask=w_mask, other=0.0)
        acc_gate = tl.dot(x_tile, as_dot_operand(w_gate, INTERPRETED), acc_gate,
                          input_precision=DOT_PRECISION, out_dtype=acc_gate.dtype)
        if GATED:
            if not PAIRED_LOAD:
                w_up = tl.load(w_up_ptrs, mask=w_mask, other=0.0)
            acc_up = tl.dot(x_tile, as_dot_operand(w_up, INTERPRETED), acc_up,
                            input_precision=DOT_PRECISION, out_dtype=acc_up.dtype)
            w_up_ptrs += BLOCK_K * stride_wh
        x_ptrs += BLOCK_K * stride_xh
        w_gate_ptrs += BLOCK_K * stride_wh

    if HAS_BIAS:
        b_expert = bias_ptr + expert * stride_be
        acc_gate += tl.load(b_expert + gate_rows * stride_br, mask=col_valid, other=0.0).to(acc_gate.dtype)[None, :]
        if GATED:
            up_bias = tl.load(b_expert + (gate_rows + up_offset) * stride_br, mask=col_valid, other=0.0)
            acc_up += up_bias.to(acc_up.dtype)[None, :]
    if GATED:
        h = gated_forward(acc_gate, acc_up, alpha, limit, ACTIVATION)
    else:
        h, _ = unary_activation_and_grad(acc_gate, ACTIVATION)
    # Padding rows are stored as zeros: the weight-gradient kernels multiply them by zero and
    # must not meet garbage (NaN * 0 is NaN).
    h = tl.where(row_valid[:, None], h, 0.0)
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hi
    tl.store(h_ptrs, round_to(h, h_ptr.dtype.element_ty, INTERPRETED), mask=col_valid[None, :])


def gate_up(hidden_states, w_gate_up, b_gate_up, sorted_ids_padded, block_expert, *, top_k: int,
            activation: str, layout: str, gated: bool, alpha: float, limit: float,
            config: KernelConfig) -> torch.Tensor:
    """h [M, I] (M = len(sorted_ids_padded)) in padded sorted order; padding rows are zero."""
    require_runnable(gate_up_kernel, hidden_states.device)
    num_tokens, hidden_size = hidden_states.shape
    rows_axis, hidden_axis = gate_up_axes(layout)
    intermediate_size = w_gate_up.shape[rows_axis] // (2 if gated else 1)
    col_step, up_offset = gate_up_columns(layout, gated, intermediate_size)
    num_rows = sorted_ids_padded.shape[0]
    assert block_expert.shape[0] * config.BLOCK_M >= num_rows, "block_expert does not cover sorted_ids_padded"
    h = torch.empty(num_rows, intermediate_size, dtype=hidden_states.dtype, device=hidden_states.device)
    bias = b_gate_up if b_gate_up is not None else h  # never read when HAS_BIAS is False
    grid = (block_expert.shape[0], triton.cdiv(intermediate_size, config.BLOCK_N))
    gate_up_kernel[grid](
        hidden_states, w_gate_up, bias, sorted_ids_padded, block_expert, h,
        num_tokens * top_k, top_k, hidden_size, intermediate_size, up_offset, alpha, limit,
        hidden_states.stride(0), hidden_states.stride(1),
        w_gate_up.stride(0), w_gate_up.stride(rows_axis), w_gate_up.stride(hidden_axis),
        bias.stride(0), bias.stride(1),
        h.stride(0), h.stride(1),
        **config.meta(), COL_STEP=col_step, GATED=gated, HAS_BIAS=b_gate_up is not None, ACTIVATION=activation,
        PAIRED_LOAD=paired_load(w_gate_up, rows_axis, gated, col_step),
        **dot_flags(hidden_states.dtype), num_warps=config.num_warps, num_stages=config.num_stages)
    return h
