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
dense launches pass `NO_SCALES` (never read).
Sharded weights keep partial blocks: a shard's position q along a cut axis is its local index
plus `block_offset` (BlockScales), for fp8's scales and for mxfp4's down bytes and scales alike.
"""
import torch
import triton
import triton.language as tl

from ..weights import FP8_FORMAT, MXFP4_FORMAT
from .interpret import round_to


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
def e8m0_to_float32(scale):
    """e8m0 scale bytes s -> 2^(s - 127) in float32 (s = 0, 2^-127, flushes to zero; no weight
    of GPT-OSS's has it)."""
    return (scale.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def dequantized_tile(w_ptr, w_cols, w_pos, stride_wk, scale_ptr, scale_cols, scale_pos, stride_sk, mask,
                     SCALE_BLOCK: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, dtype: tl.constexpr,
                     INTERPRETED: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile in `dtype` (the activations').

    w_ptr, scale_ptr: the expert's values and scales; w_cols, scale_cols [BLOCK_N]: each column's
    offset into them; w_pos [BLOCK_K]: positions along the contraction axis of the stored values
    (mxfp4: of the nibbles, so byte w_pos // 2), scale_pos [BLOCK_K] those of the scales (block
    scale_pos // SCALE_BLOCK); stride_wk, stride_sk: the strides of one value (mxfp4: one byte)
    and of one scale block along it. Masked entries are zero. fp8's products are rounded to
    nearest (`round_to`: the interpreter's cast would truncate); mxfp4's are exact in any dtype."""
    if WEIGHT_FORMAT == "mxfp4":
        packed = tl.load(w_ptr + w_cols[None, :] + (w_pos // 2)[:, None] * stride_wk, mask=mask, other=0)
        nibble = packed >> ((w_pos % 2) * 4).to(tl.uint8)[:, None]
        scale = tl.load(scale_ptr + scale_cols[None, :] + (scale_pos // SCALE_BLOCK)[:, None] * stride_sk,
                        mask=mask, other=127)
        value = e2m1_to_float32(nibble) * e8m0_to_float32(scale)
    else:  # fp8_block
        value = tl.load(w_ptr + w_cols[None, :] + w_pos[:, None] * stride_wk, mask=mask, other=0.0)
        scale = tl.load(scale_ptr + scale_cols[None, :] + (scale_pos // SCALE_BLOCK)[:, None] * stride_sk,
                        mask=mask, other=0.0)
        value = value.to(tl.float32) * scale
    return round_to(value, dtype, INTERPRETED)


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
        if projection == "gate_up":  # [E, G, blocks of I_p (columns), blocks of H (contraction)]
            return weight, tuple(scale.stride())
        # [E, blocks of H (columns of the tile), blocks of I_p (contraction)]
        return weight, (scale.stride(0), 0, scale.stride(1), scale.stride(2))
    raise ValueError(f"tpmoe.triton: no dequantizing load for weight format {weight_format!r}")


def weight_arguments(weight, scale, weight_format: str, projection: str, block_size: int, block_offset: int,
                     placeholder: torch.Tensor):
    """(values, keyword arguments of the kernel's scale parameters) for a launch on `weight`:
    scale_ptr, block_offset, the scale strides (stride_se, stride_sg for gate_up only, stride_sn,
    stride_sk), WEIGHT_FORMAT and SCALE_BLOCK. Dense: `weight` itself, and `placeholder` (any
    tensor) as the scale pointer, never read."""
    if weight_format == "dense":
        values, scale, strides, block_size, block_offset = weight, placeholder, (0, 0, 0, 0), 1, 0
    else:
        values, strides = quantized_operand(weight, scale, weight_format, projection)
    arguments = dict(scale_ptr=scale, block_offset=block_offset, stride_se=strides[0], stride_sg=strides[1],
                     stride_sn=strides[2], stride_sk=strides[3], WEIGHT_FORMAT=weight_format, SCALE_BLOCK=block_size)
    if projection != "gate_up":
        del arguments["stride_sg"]
    return values, arguments
