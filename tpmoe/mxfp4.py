"""MXFP4 expert weights ("mxfp4", GPT-OSS's): the format, its checks, and its TP / EP shards.

GPT-OSS ships its experts as e2m1 values packed two a byte with one e8m0 scale (2^(s - 127))
per 32 values along the contraction axis: transformers' `gate_up_proj_blocks` [E, 2I, H / 32, 16]
with `gate_up_proj_scales` [E, 2I, H / 32], and `down_proj_blocks` [E, H, I / 32, 16] with
`down_proj_scales` [E, H, I / 32], all uint8, read here in place. The rows are the projection's
outputs (x @ W^T): gate_up's rows interleave gate and up (row 2i gate i, row 2i + 1 up i), the
spec's "interleaved" layout; a byte holds value 2j in its low nibble and 2j + 1 in its high one.

  w_gate_up   uint8 [E, R, nb(H), 16]      R = 2 I_p gated (interleaved or concatenated), I_p not
  w_down      uint8 [E, H, nb(I_p), 16]
  scales      BlockScales (tpmoe.fp8's holder), block_size 32:
    gate_up   uint8 [E, R, nb(H)]
    down      uint8 [E, H, nb(I_p)]
    block_offset o: where the rank's first intermediate value sits inside its first 32-block of
    down (its global start mod 32); nb(I_p) = ceil((o + I_p) / 32), nb(H) = ceil(H / 32)

Sharding at any TP size: gate_up keeps whole rows (its blocks run along H, which TP does not
cut). down's blocks run along I: a block cut by a shard boundary goes whole, bytes and scale, to
both ranks, and each reads only its own values of it (from o on, I_p of them): nothing is
padded into the math. EP keeps whole experts with their scales.
"""
from typing import Tuple

import torch

from ._checks import check_choice
from .fp8 import BlockScales, _from_halves, _halves
from .sharding import expert_range, shard_range
from .weights import MXFP4_FORMAT, ExpertWeights

MXFP4_BLOCK = 32
MXFP4_LAYOUTS = ("concatenated", "interleaved")
# e2m1: sign, 2 exponent bits, 1 mantissa bit, indexed by the nibble.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _blocks(size: int, offset: int = 0) -> int:
    return -(-(offset + size) // MXFP4_BLOCK)


def _unpack(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., nb, 16] uint8 and [..., nb] uint8 e8m0 -> [..., nb * 32] values in dtype."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float64, device=blocks.device)
    low, high = table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., nb, 32]: low nibble first
    values = values * torch.exp2(scales.double() - 127).unsqueeze(-1)
    return values.flatten(-2).to(dtype)


def dequantize_mxfp4_experts(weights: ExpertWeights, *, layout: str, gated: bool,
                             dtype: torch.dtype = torch.float32, experts: Tuple[int, int] = None) -> ExpertWeights:
    """The dense ExpertWeights (dtype; w_gate_up [E, R, H], w_down [E, H, I_p], the layout's
    packing) that "mxfp4" `weights` stand for; `experts` = (first, count) only those."""
    first, count = experts if experts is not None else (0, weights.w_gate_up.shape[0])
    chosen = slice(first, first + count)
    hidden = weights.w_down.shape[1]
    offset, inter = weights.scales.block_offset, _intermediate(weights, gated)
    gate_up = _unpack(weights.w_gate_up[chosen], weights.scales.gate_up[chosen], dtype)[..., :hidden]
    down = _unpack(weights.w_down[chosen], weights.scales.down[chosen], dtype)[..., offset:offset + inter]
    return ExpertWeights(gate_up, down, weights.b_gate_up, weights.b_down)


def _intermediate(weights: ExpertWeights, gated: bool) -> int:
    rows = weights.w_gate_up.shape[1]
    return rows // 2 if gated else rows


def quantize_mxfp4_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor, *, layout: str = "interleaved",
                           gated: bool = True, b_gate_up=None, b_down=None) -> ExpertWeights:
    """Full float expert weights (w_gate_up [E, R, H], w_down [E, H, I]) -> "mxfp4": per 32-block
    the power-of-two scale that brings its largest magnitude within e2m1's 6, each value rounded
    to the nearest e2m1 value. For tests and random models: checkpoints come quantized."""
    check_choice(layout, "layout", MXFP4_LAYOUTS)
    gate_up_blocks, gate_up_scales = _quantize(w_gate_up)
    down_blocks, down_scales = _quantize(w_down)
    return ExpertWeights(gate_up_blocks, down_blocks, b_gate_up, b_down, MXFP4_FORMAT,
                         BlockScales(gate_up_scales, down_scales, MXFP4_BLOCK, 0))


def _quantize(matrix: torch.Tensor):
    """[E, ..., cols] float -> ([E, ..., nb, 16] uint8, [E, ..., nb] uint8), the last block
    zero-padded; a few experts at a time in float64 (a model's experts are never widened at once)."""
    packed, scales = zip(*(_quantize_experts(matrix[first:first + 4]) for first in range(0, matrix.shape[0], 4)))
    return torch.cat(packed), torch.cat(scales)


# Midpoints between e2m1's magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6: a magnitude's nearest value.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _quantize_experts(matrix: torch.Tensor):
    cols = matrix.shape[-1]
    padded = torch.nn.functional.pad(matrix.double(), (0, _blocks(cols) * MXFP4_BLOCK - cols))
    grouped = padded.unflatten(-1, (-1, MXFP4_BLOCK))
    amax = grouped.abs().amax(dim=-1).clamp_min(2.0 ** -126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = grouped / torch.exp2(exponent).unsqueeze(-1)
    magnitude = torch.bucketize(scaled.abs(), torch.tensor(_MIDPOINTS, dtype=torch.float64))
    nibbles = (magnitude + 8 * (scaled < 0)).to(torch.uint8)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return packed.contiguous(), (exponent + 127).to(torch.uint8)


def _shard_bounds(whole: ExpertWeights, gated: bool, rank: int, world_size: int, ep_rank: int, ep_size: int):
    """(the EP rank's experts as a slice, the TP rank's intermediate columns [start, stop), the
    32-blocks [first_block, last_block) that hold them) of whole "mxfp4" experts."""
    first, count = expert_range(whole.w_gate_up.shape[0], ep_rank, ep_size)
    start, stop = shard_range(_intermediate(whole, gated), rank, world_size)
    first_block = start // MXFP4_BLOCK
    return slice(first, first + count), start, stop, first_block, _blocks(stop) if stop > start else first_block


def shard_mxfp4_experts(full: ExpertWeights, *, layout: str, gated: bool, rank: int, world_size: int,
                        ep_rank: int = 0, ep_size: int = 1) -> ExpertWeights:
    """TP rank `rank`'s (and EP rank `ep_rank`'s) slice of full "mxfp4" weights: gate_up's rows of
    its intermediate columns (torch.chunk's rule), down's 32-blocks that hold them (a block cut by
    a boundary goes to both sides) and the offset into the first; whole experts for EP. Copies."""
    experts, start, stop, first_block, last_block = _shard_bounds(full, gated, rank, world_size, ep_rank, ep_size)
    offset = start % MXFP4_BLOCK if stop > start else 0

    def rows(tensor):  # the rank's rows of a [E, R, ...] gate_up tensor, packed as before
        halves = _halves(tensor[experts].flatten(2), layout, gated)[:, :, start:stop]
        return _from_halves(halves, layout, gated).unflatten(2, tensor.shape[2:]).contiguous()

    def bias_rows(bias):
        return None if bias is None else rows(bias.unsqueeze(-1)).squeeze(-1)
    scales = BlockScales(rows(full.scales.gate_up), full.scales.down[experts, :, first_block:last_block].contiguous(),
                         MXFP4_BLOCK, offset)
    return ExpertWeights(rows(full.w_gate_up), full.w_down[experts, :, first_block:last_block].contiguous(),
                         bias_rows(full.b_gate_up), None if full.b_down is None else full.b_down[experts].contiguous(),
                         MXFP4_FORMAT, scales)


def place_mxfp4_shard(whole: ExpertWeights, local: ExpertWeights, *, layout: str, gated: bool, rank: int,
                      world_size: int, ep_rank: int = 0, ep_size: int = 1) -> None:
    """The inverse of shard_mxfp4_experts: writes TP rank `rank`'s (and EP rank `ep_rank`'s) slice
    `local` into the whole "mxfp4" experts `whole`, in place (a 32-block cut by a shard boundary
    is on both sides, the same)."""
    experts, start, stop, first_block, last_block = _shard_bounds(whole, gated, rank, world_size, ep_rank, ep_size)

    def place_rows(target, rows):  # a [E, R, ...] gate_up tensor's rows of the shard, packed as before
        halves = _halves(rows.flatten(2), layout, gated)
        _halves(target[experts].flatten(2), layout, gated)[:, :, start:stop] = halves
    place_rows(whole.w_gate_up, local.w_gate_up)
    place_rows(whole.scales.gate_up, local.scales.gate_up)
    whole.w_down[experts, :, first_block:last_block] = local.w_down
    whole.scales.down[experts, :, first_block:last_block] = local.scales.down


def check_mxfp4_experts(weights: ExpertWeights, *, hidden_size: int, layout: str, gated: bool, device: torch.device,
                        argument: str = "weights") -> Tuple[int, int]:
    """(E, I_p) of "mxfp4" weights after checking the packing, the scales and their agreement
    (I_p from gate_up's rows, which are whole on every rank)."""
    check_choice(layout, f"{argument}: layout of mxfp4 weights", MXFP4_LAYOUTS)
    scales = weights.scales
    if not isinstance(scales, BlockScales):
        raise TypeError(f"{argument}.scales: expected a tpmoe.fp8.BlockScales for format {MXFP4_FORMAT!r}, got "
                        f"{type(scales).__name__}")
    if scales.block_size != MXFP4_BLOCK:
        raise ValueError(f"{argument}.scales.block_size: expected {MXFP4_BLOCK} (MXFP4's block), got "
                         f"{scales.block_size!r}")
    offset = scales.block_offset
    if not isinstance(offset, int) or not 0 <= offset < MXFP4_BLOCK:
        raise ValueError(f"{argument}.scales.block_offset: expected an int in [0, {MXFP4_BLOCK}), got {offset!r}")
    if not isinstance(weights.w_gate_up, torch.Tensor) or weights.w_gate_up.dim() != 4:
        got = tuple(weights.w_gate_up.shape) if isinstance(weights.w_gate_up, torch.Tensor) else type(
            weights.w_gate_up).__name__
        raise ValueError(f"{argument}.w_gate_up: expected [E, R, 32-blocks of H, 16] packed bytes, got {got}")
    num_experts, rows = weights.w_gate_up.shape[:2]
    if gated and rows % 2 != 0:
        raise ValueError(f"{argument}.w_gate_up: gated experts need an even gate+up size on axis 1, got {rows}")
    intermediate_size = rows // 2 if gated else rows
    expected = {
        "w_gate_up": (weights.w_gate_up, (num_experts, rows, _blocks(hidden_size), 16)),
        "w_down": (weights.w_down, (num_experts, hidden_size, _blocks(intermediate_size, offset), 16)),
        "scales.gate_up": (scales.gate_up, (num_experts, rows, _blocks(hidden_size))),
        "scales.down": (scales.down, (num_experts, hidden_size, _blocks(intermediate_size, offset))),
    }
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8:
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{argument}.{name}: expected a uint8 tensor for format {MXFP4_FORMAT!r} (packed e2m1 "
                            f"pairs, e8m0 scales), got {got}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{argument}.{name}: expected shape {shape} (E, rows, 32-blocks of H = {hidden_size} or "
                             f"of I_p = {intermediate_size} at offset {offset}{', 16 bytes' if len(shape) == 4 else ''})"
                             f", got {tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"{argument}.{name}: expected device {device} (that of hidden_states), got {tensor.device}")
    return num_experts, intermediate_size
