"""Weight-only dequantization in the B-load of the forward kernels (gate_up, down).

A kernel specialised on WEIGHT_FORMAT ("dense", "fp8_block", "mxfp4": tpmoe.weights) loads the
stored bytes of the [BLOCK_K, BLOCK_N] weight tile it needs and their scales, dequantizes them in
registers to the activations' dtype and feeds `tl.dot`: no dequantized copy of an expert exists.

  fp8_block  e4m3 values (tpmoe.fp8), one float32 scale per B x B block: value * scale
  mxfp4      e2m1 nibbles, two a byte, low nibble first, one e8m0 scale 2^(s - 127) per 32
             values along the contraction axis (tpmoe.mxfp4): the byte at position q // 2 of the
             row, its nibble q % 2, times the scale of block q // 32

The launchers hand the kernels each operand as (pointer, strides) through `quantized_operand`:
mxfp4's [E, rows, blocks, 16] bytes as [E, rows, blocks * 16] (byte q // 2 of a row), and the
scales' strides by role (per expert, per gate/up half, per column, per contraction block);
fp8's values as uint8 (decoded by bits: sm_80 has no fp8 type). Dense launches pass a placeholder
scale pointer, never read (`weight_arguments`).
Sharded weights keep partial blocks: a shard's position q along a cut axis is its local index
plus `block_offset` (BlockScales), for fp8's scales and for mxfp4's down bytes and scales alike.
"""
import torch
import triton
import triton.language as tl

from ..weights import FP8_FORMAT, MXFP4_FORMAT
from .interpret import as_dot_operand, round_to


@triton.jit
def e2m1_to_float32(nibble):
    """e2m1 (sign, 2 exponent bits with bias 1, 1 mantissa bit) nibbles -> float32, exactly:
    built as float32 bit patterns (0.5 the subnormal, 0 the zero)."""
    code = (nibble & 7).to(tl.int32)
    exponent = code >> 1
    mantissa = code & 1
    normal = ((exponent + 126) << 23) | (mantissa << 22)
    bits = tl.where(exponent == 0, mantissa * (126 << 23), normal)
    bits = bits | ((nibble & 8).to(tl.int32) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_to_float32(byte):
    """float8 e4m3fn bytes (read as uint8: sm_80 has no fp8 type) -> float32, exactly: normal
    values as float32 bit patterns, subnormals as mantissa * 2^-9 (no weight is NaN, 0x7F)."""
    bits = byte.to(tl.int32)
    exponent = (bits >> 3) & 15
    mantissa = bits & 7
    normal = ((bits & 0x80) << 24) | ((exponent + 120) << 23) | (mantissa << 20)
    subnormal = mantissa.to(tl.float32) * 0.001953125
    subnormal = tl.where((bits & 0x80) != 0, -subnormal, subnormal)
    return tl.where(exponent == 0, subnormal, normal.to(tl.float32, bitcast=True))


@triton.jit
def e8m0_to_float32(scale):
    """e8m0 scale bytes s -> 2^(s - 127) in float32 (s = 0, 2^-127, flushes to zero; no weight
    of GPT-OSS's has it)."""
    return (scale.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _block_scales(scale_ptr, scale_cols, pos, first, end, stride_sk, col_valid, SCALE_BLOCK: tl.constexpr,
                  SCALE_SPAN: tl.constexpr, WEIGHT_FORMAT: tl.constexpr):
    """[len(pos), BLOCK_N] float32 scales of the tile rows at positions `pos` (all in
    [first, first + SCALE_SPAN blocks)): one [BLOCK_N] load per scale block the k-step touches,
    each row then picking its block's, rather than a load per element. Blocks from `end` on
    (past the valid rows) are not read."""
    first_block = first // SCALE_BLOCK
    row_block = (pos // SCALE_BLOCK)[:, None]
    scale = tl.zeros((pos.shape[0], scale_cols.shape[0]), dtype=tl.float32)
    for j in tl.static_range(SCALE_SPAN):
        block = first_block + j
        valid = col_valid & (tl.full((1,), block * SCALE_BLOCK, tl.int32) < end)
        if WEIGHT_FORMAT == "mxfp4":
            stored = tl.load(scale_ptr + scale_cols + block * stride_sk, mask=valid, other=127)
            column_scale = e8m0_to_float32(stored)
        else:
            column_scale = tl.load(scale_ptr + scale_cols + block * stride_sk, mask=valid, other=0.0)
        scale = tl.where(row_block == block, column_scale[None, :], scale)
    return scale


@triton.jit
def dequantized_dot(a_tile, acc, w_ptr, w_cols, w_first, stride_wk, scale_ptr, scale_cols, scale_first, stride_sk,
                    k_count, col_valid, BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr, SCALE_SPAN: tl.constexpr,
                    WEIGHT_FORMAT: tl.constexpr, dtype: tl.constexpr,
                    INTERPRETED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a_tile [BLOCK_M, BLOCK_K] @ the dequantized [BLOCK_K, BLOCK_N] weight tile.

    w_ptr, scale_ptr: the expert's values and scales; w_cols, scale_cols [BLOCK_N]: each column's
    offset into them; w_first: the stored position of the tile's first row along the contraction
    axis (mxfp4: of its nibble), stride_wk that of one value (mxfp4: one byte); scale_first the
    first row's position in scale blocks' terms (block scale_first // SCALE_BLOCK), stride_sk that
    of one scale block; k_count: the tile's valid rows (the rest read as zero); col_valid [BLOCK_N].
    SCALE_SPAN: the most scale blocks a k-step touches (`scale_span`).

    fp8_block: the [BLOCK_K, BLOCK_N] values (contiguous along k), times their scales, rounded to
    `dtype` (round_to: the interpreter's cast would truncate). mxfp4: row k reads its nibble of
    byte (w_first + k) // 2 (two rows share a byte: the second read hits the cache; unpacking a
    [BLOCK_K / 2, BLOCK_N] byte tile and joining or splitting the halves cost 255 registers and
    spills on sm_80 and sm_90 in the AOT table), times the scale: exact in any dtype."""
    offs_k = tl.arange(0, BLOCK_K)
    valid = (offs_k < k_count)[:, None] & col_valid[None, :]
    scale = _block_scales(scale_ptr, scale_cols, scale_first + offs_k, scale_first, scale_first + k_count, stride_sk,
                          col_valid, SCALE_BLOCK, SCALE_SPAN, WEIGHT_FORMAT)
    if WEIGHT_FORMAT == "mxfp4":  # row k: the low or high nibble of byte (w_first + k) // 2
        position = w_first + offs_k
        packed = tl.load(w_ptr + w_cols[None, :] + (position // 2)[:, None] * stride_wk, mask=valid, other=0)
        w_tile = (e2m1_to_float32(packed >> ((position % 2) * 4).to(tl.uint8)[:, None]) * scale).to(dtype)
    else:  # fp8_block
        value = e4m3_to_float32(tl.load(w_ptr + w_cols[None, :] + (w_first + offs_k)[:, None] * stride_wk,
                                        mask=valid, other=0))
        w_tile = round_to(value * scale, dtype, INTERPRETED)
    return tl.dot(as_dot_operand(a_tile, INTERPRETED), as_dot_operand(w_tile, INTERPRETED), acc,
                  input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def round_to_e4m3(value):
    """float32 |value| <= 448 rounded to nearest even on the e4m3 grid, in float32, exactly (the
    interpreter's fp8 cast is not the GPU's cvt.rn): the quantum is 2^(e - 3) for the value's
    exponent e, at least 2^-9 (e4m3's subnormals), and y = value / quantum is rounded by hand."""
    bits = value.to(tl.uint32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF).to(tl.int32) - 127, -6)
    quantum = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    scaled = tl.abs(value) / quantum  # exact: a power of two
    whole = tl.floor(scaled)
    rest = scaled - whole
    odd = (whole - 2.0 * tl.floor(whole * 0.5)) != 0.0
    whole = tl.where((rest > 0.5) | ((rest == 0.5) & odd), whole + 1.0, whole)
    return tl.where(value < 0, -whole * quantum, whole * quantum)


@triton.jit
def fp8_activation_dot(a_tile, acc, w_ptr, w_cols, w_first, stride_wk, scale_ptr, scale_cols, block, stride_sk,
                       k_valid, col_valid, BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + (q(a) @ w) * a_scale[row] * w_scale[column]: one k-step of the fp8 x fp8 variant
    (ACT_FP8) on fp8_block weights, the k-step being exactly one scale group of the activations
    and scale block `block` of the weights (BLOCK_K = B, steps aligned to the blocks: a group
    split over two steps would get two scales).

    a_tile [BLOCK_M, BLOCK_K] (any float dtype, zeros where nothing was loaded) is quantized per
    row as tpmoe.fp8.quantize_fp8_activations does (scale = amax / 448, 1 for a row of zeros;
    values rounded to nearest even e4m3); the [BLOCK_K, BLOCK_N] weight bytes at w_cols +
    (w_first + k) * stride_wk (k_valid [BLOCK_K], col_valid [BLOCK_N] say which exist) enter the
    dot as e4m3, the product accumulates in float32 and is scaled by the row's and the column's
    block scale (scale_ptr + scale_cols + block * stride_sk) before it is added. Compiled
    (sm_90), the operands are float8e4nv (an fp8 wgmma); under the interpreter the same values in
    float32 (its fp8 dot and casts are not the GPU's)."""
    a = a_tile.to(tl.float32)
    amax = tl.max(tl.abs(a), axis=1)
    a_scale = tl.where(amax > 0, amax / 448.0, 1.0)
    if INTERPRETED:
        a_scaled = a / a_scale[:, None]
    else:
        a_scaled = tl.math.div_rn(a, a_scale[:, None])  # IEEE division, as torch's
    a_scaled = tl.minimum(tl.maximum(a_scaled, -448.0), 448.0)
    offs_k = tl.arange(0, BLOCK_K)
    stored = tl.load(w_ptr + w_cols[None, :] + (w_first + offs_k)[:, None] * stride_wk,
                     mask=k_valid[:, None] & col_valid[None, :], other=0)
    w_scale = tl.load(scale_ptr + scale_cols + block * stride_sk, mask=col_valid, other=0.0)
    if INTERPRETED:
        partial = tl.dot(round_to_e4m3(a_scaled), e4m3_to_float32(stored), input_precision="ieee",
                         out_dtype=tl.float32)
    else:
        partial = tl.dot(a_scaled.to(tl.float8e4nv), stored.to(tl.float8e4nv, bitcast=True), out_dtype=tl.float32)
    return acc + (partial * a_scale[:, None] * w_scale[None, :]).to(acc.dtype)


def scale_span(block_k: int, block_size: int, offset: int) -> int:
    """The most scale blocks of `block_size` one k-step touches, the steps covering positions
    [offset + m * block_k, offset + (m + 1) * block_k) (a split starts on a step too)."""
    return max(((offset + m * block_k) % block_size + block_k - 1) // block_size + 1 for m in range(block_size))


def quantized_operand(weight: torch.Tensor, scale: torch.Tensor, weight_format: str, projection: str):
    """(values, scale_strides): the kernel's view of a quantized `weight` ("gate_up" or "down" of
    an ExpertWeights of `weight_format`) and of its `scale` tensor (BlockScales.gate_up / .down).

    values: the stored tensor, mxfp4's [E, rows, blocks, 16] as [E, rows, blocks * 16] bytes;
    scale_strides: (expert, gate/up half, column of the tile, contraction block), 0 where the
    scale tensor has no such axis."""
    if weight_format == MXFP4_FORMAT:
        # Scales [E, rows, blocks]: one per row (a column of the tile) and contraction block.
        values = weight if weight.stride(2) == 16 * weight.stride(3) else weight.contiguous()
        return values.flatten(2), (scale.stride(0), 0, scale.stride(1), scale.stride(2))
    if weight_format == FP8_FORMAT:
        weight = weight.view(torch.uint8)  # decoded by bits in the kernel (e4m3_to_float32)
        if projection == "gate_up":  # [E, G, blocks of I_p (columns), blocks of H (contraction)]
            return weight, tuple(scale.stride())
        # [E, blocks of H (columns of the tile), blocks of I_p (contraction)]
        return weight, (scale.stride(0), 0, scale.stride(1), scale.stride(2))
    raise ValueError(f"tpmoe.triton: no dequantizing load for weight format {weight_format!r}")


def weight_arguments(weight, scale, weight_format: str, projection: str, block_size: int, block_offset: int,
                     block_k: int, placeholder: torch.Tensor, fp8_activations: bool = False):
    """(values, keyword arguments of the kernel's scale parameters) for a launch on `weight`:
    scale_ptr, block_offset, the scale strides (stride_se, stride_sg for gate_up only, stride_sn,
    stride_sk), WEIGHT_FORMAT, SCALE_BLOCK and SCALE_SPAN (`scale_span` of the k-steps of
    block_k), and ACT_FP8 (`fp8_activations`: the fp8 x fp8 k-steps of fp8_activation_dot, on
    fp8_block weights with block_k = block_size only). Dense: `weight`
    itself, and `placeholder` (any tensor) as the scale pointer, never read."""
    if fp8_activations and (weight_format != FP8_FORMAT or block_k != block_size):
        raise ValueError(f"tpmoe.triton: fp8 activations need {FP8_FORMAT!r} weights and BLOCK_K = block_size, got "
                         f"{weight_format!r}, BLOCK_K {block_k}, block_size {block_size}")
    if weight_format == "dense":
        values, scale, strides, block_size, block_offset = weight, placeholder, (0, 0, 0, 0), 1, 0
    else:
        values, strides = quantized_operand(weight, scale, weight_format, projection)
    arguments = dict(scale_ptr=scale, block_offset=block_offset, stride_se=strides[0], stride_sg=strides[1],
                     stride_sn=strides[2], stride_sk=strides[3], WEIGHT_FORMAT=weight_format, SCALE_BLOCK=block_size,
                     SCALE_SPAN=scale_span(block_k, block_size, block_offset if projection == "down" else 0),
                     ACT_FP8=fp8_activations)
    if projection != "gate_up":
        del arguments["stride_sg"]
    return values, arguments
