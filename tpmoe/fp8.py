"""Block-scaled fp8 expert weights ("fp8_block"): the format, its checks, and its TP / EP shards.

The checkpoints users serve (DeepSeek-V3, Qwen3 FP8) store each expert projection as float8
e4m3 values with one float32 scale per B x B block (B = 128; transformers' fine-grained FP8:
`weight` and `weight_scale_inv`, where value = fp8 * weight_scale_inv). tpmoe holds a rank's
experts as an ExpertWeights of format "fp8_block":

  w_gate_up   float8_e4m3fn [E, R, H], packed as the layout says (concatenated or interleaved)
  w_down      float8_e4m3fn [E, H, I_p]
  scales      BlockScales:
    gate_up   float32 [E, G, nb(I_p), nb(H)]  G = 2 gated (gate, up), 1 not; one scale per B x B
                                              block of each half seen as its own [I, H] matrix
    down      float32 [E, nb(H), nb(I_p)]
    block_size B, and block_offset o: where the rank's first intermediate column sits inside
    its scale block (its global start mod B), so nb(I_p) = ceil((o + I_p) / B) and nb(H) =
    ceil(H / B) (a last partial block where B does not divide a size, as transformers' scales)

value[e, g, i, h] = fp8[e, g, i, h] * gate_up[e, g, (o + i) // B, h // B] (down likewise, with
i on its last axis). transformers' gate_up_proj_scale_inv [E, 2I / B, H / B] is this gate_up
scale reshaped ([E, 2, I / B, H / B]) where B divides the full I; where it does not, a block of
transformers' straddles gate and up, which this format cannot say.

Sharding at any TP size: the intermediate axis splits by torch.chunk's rule (tpmoe.sharding),
whatever B is. A shard boundary inside a scale block leaves that block's scale with BOTH ranks
(each keeps its partial block, read with the same scale): nothing is padded into the math, and
every rank computes with exactly the dequantized full weights' columns. EP keeps whole experts
and their scales.
"""
from typing import NamedTuple, Optional, Tuple

import torch

from ._checks import check_choice
from .sharding import expert_range, shard_range
from .weights import FP8_FORMAT, ExpertWeights

FP8_DTYPE = torch.float8_e4m3fn
FP8_LAYOUTS = ("concatenated", "interleaved")
DEFAULT_BLOCK_SIZE = 128


class BlockScales(NamedTuple):
    """The float32 scales of block-scaled expert weights (module docstring: shapes and meaning)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    block_size: int
    block_offset: int = 0


def _halves(w_gate_up: torch.Tensor, layout: str, gated: bool) -> torch.Tensor:
    """[E, G, I, H] view of a [E, R, H] gate_up: each half (gate, up) as its own matrix."""
    num_experts, rows, hidden = w_gate_up.shape
    if not gated:
        return w_gate_up.unsqueeze(1)
    if layout == "concatenated":
        return w_gate_up.view(num_experts, 2, rows // 2, hidden)
    return w_gate_up.view(num_experts, rows // 2, 2, hidden).transpose(1, 2)


def _from_halves(halves: torch.Tensor, layout: str, gated: bool) -> torch.Tensor:
    """The inverse of _halves (a copy where the layout interleaves)."""
    num_experts, groups, inter, hidden = halves.shape
    if not gated:
        return halves[:, 0]
    if layout == "concatenated":
        return halves.reshape(num_experts, 2 * inter, hidden)
    return halves.transpose(1, 2).reshape(num_experts, 2 * inter, hidden)


def _blocks(size: int, block_size: int, offset: int = 0) -> int:
    return -(-(offset + size) // block_size)


def _scale_blocks(matrix: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-block amax of [..., rows, cols]: [..., nb(rows), nb(cols)], a last partial block
    covering what is left (transformers' ceil(size / B) scales)."""
    *lead, rows, cols = matrix.shape
    row_blocks, col_blocks = _blocks(rows, block_size), _blocks(cols, block_size)
    padded = torch.nn.functional.pad(matrix.abs(), (0, col_blocks * block_size - cols, 0,
                                                    row_blocks * block_size - rows))
    blocked = padded.reshape(*lead, row_blocks, block_size, col_blocks, block_size)
    return blocked.amax(dim=(-3, -1))


def _expand(scale: torch.Tensor, rows: int, cols: int, block_size: int, row_offset: int, col_offset: int):
    """[..., nb_r, nb_c] block scales -> [..., rows, cols], entry (i, j) the scale of block
    ((row_offset + i) // B, (col_offset + j) // B)."""
    row_blocks = (torch.arange(rows, device=scale.device) + row_offset) // block_size
    col_blocks = (torch.arange(cols, device=scale.device) + col_offset) // block_size
    return scale.index_select(-2, row_blocks).index_select(-1, col_blocks)


def quantize_fp8_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor, *, layout: str = "concatenated",
                         gated: bool = True, block_size: int = DEFAULT_BLOCK_SIZE, b_gate_up=None, b_down=None):
    """Full (unsharded) float expert weights -> an ExpertWeights of format "fp8_block": one scale
    per block (_quantize_blocks). For tests, benchmarks and random models: checkpoints come
    quantized. The biases stay as they are."""
    check_choice(layout, "layout", FP8_LAYOUTS)
    _check_block_size(block_size)
    halves = _halves(w_gate_up, layout, gated)
    num_experts, groups, inter, hidden = halves.shape
    if tuple(w_down.shape) != (num_experts, hidden, inter):
        raise ValueError(f"w_down: expected shape {(num_experts, hidden, inter)} (E, H, I from w_gate_up), got "
                         f"{tuple(w_down.shape)}")
    gate_up_q, down_q, gate_up_scales, down_scales = [], [], [], []
    # A few experts at a time in float64: a model's experts are never all widened at once.
    for first in range(0, num_experts, 8):
        chunk = slice(first, first + 8)
        gate_up, down = _quantize_blocks(halves[chunk].double(), block_size), _quantize_blocks(
            w_down[chunk].double(), block_size)
        gate_up_q.append(gate_up[0])
        gate_up_scales.append(gate_up[1])
        down_q.append(down[0])
        down_scales.append(down[1])
    return ExpertWeights(_from_halves(torch.cat(gate_up_q), layout, gated).contiguous(), torch.cat(down_q),
                         b_gate_up, b_down, FP8_FORMAT,
                         BlockScales(torch.cat(gate_up_scales), torch.cat(down_scales), block_size, 0))


def _quantize_blocks(matrix: torch.Tensor, block_size: int):
    """(fp8 values, float32 scales) of float64 [..., rows, cols]: scale = block amax / 448 (e4m3's
    largest finite value), as DeepSeek-V3's FP8 recipe does."""
    rows, cols = matrix.shape[-2:]
    scale = (_scale_blocks(matrix, block_size) / torch.finfo(FP8_DTYPE).max).clamp_min(1e-12).float()
    return (matrix / _expand(scale.double(), rows, cols, block_size, 0, 0)).to(FP8_DTYPE), scale


FP8_MAX = 448.0  # e4m3fn's largest finite value


def quantize_fp8_activations(x: torch.Tensor, block_size: int, block_offset: int = 0):
    """(e4m3 values [T, K], float32 scales [T, nb]) of activations x [T, K]: per token and per
    group of columns aligned to the weights' B x B scale blocks (DeepSeek-V3's and vLLM's
    per-token-group fp8 scheme), the one definition the Triton fp8 x fp8 kernels
    (tpmoe.triton.dequant.fp8_activation_dot) compute in registers and the tests compare with.

    Group g covers the local columns [max(0, g B - o), min(K, (g + 1) B - o)) (o = block_offset:
    where column 0 sits inside its scale block, a TP shard's BlockScales.block_offset), so nb =
    ceil((o + K) / B) and every group lies inside one weight scale block. In float32: scale =
    amax(|x| over the group) / 448 (a group of zeros gets scale 1, so its values stay 0 and no NaN
    appears), values = x / scale rounded to nearest even e4m3 (|values| <= 448). x * 1 keeps a
    value's sign; value * scale is the dequantized activation."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 2-D floating-point tensor [T, K], got {got}")
    _check_block_size(block_size)
    if not isinstance(block_offset, int) or isinstance(block_offset, bool) or not 0 <= block_offset < block_size:
        raise ValueError(f"block_offset: expected an int in [0, {block_size}) (block_size {block_size}), got "
                         f"{block_offset!r}")
    num_tokens, size = x.shape
    groups = _blocks(size, block_size, block_offset)
    padded = torch.nn.functional.pad(x.float(), (block_offset, groups * block_size - block_offset - size))
    grouped = padded.view(num_tokens, groups, block_size)
    scale = grouped.abs().amax(dim=2) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = (grouped / scale.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    values = values.view(num_tokens, groups * block_size)[:, block_offset:block_offset + size]
    return values.contiguous(), scale


def dequantize_fp8_activations(values: torch.Tensor, scales: torch.Tensor, block_size: int, block_offset: int = 0,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """values * their group's scale in dtype: what quantize_fp8_activations' output stands for."""
    groups = (torch.arange(values.shape[1], device=values.device) + block_offset) // block_size
    return values.to(dtype) * scales.to(dtype).index_select(1, groups)


def dequantize_fp8_experts(weights, *, layout: str, gated: bool, dtype: torch.dtype = torch.float32,
                           experts: Optional[Tuple[int, int]] = None):
    """The dense ExpertWeights (dtype) that "fp8_block" `weights` stand for; `experts` = (first,
    count) dequantizes only those (the CPU path's one expert at a time)."""
    first, count = experts if experts is not None else (0, weights.w_gate_up.shape[0])
    scales = weights.scales
    block, offset = scales.block_size, scales.block_offset
    halves = _halves(weights.w_gate_up[first:first + count], layout, gated)
    inter, hidden = halves.shape[-2:]
    gate_up = halves.to(dtype) * _expand(scales.gate_up[first:first + count], inter, hidden, block, offset, 0).to(dtype)
    down = weights.w_down[first:first + count].to(dtype) * _expand(
        scales.down[first:first + count], hidden, inter, block, 0, offset).to(dtype)
    return ExpertWeights(_from_halves(gate_up, layout, gated), down, weights.b_gate_up, weights.b_down)


def _shard_bounds(whole, rank: int, world_size: int, ep_rank: int, ep_size: int):
    """(the EP rank's experts as a slice, the TP rank's intermediate columns [start, stop), the
    scale blocks [first_block, last_block) that hold them) of whole "fp8_block" experts."""
    first, count = expert_range(whole.w_gate_up.shape[0], ep_rank, ep_size)
    start, stop = shard_range(whole.w_down.shape[2], rank, world_size)
    block = whole.scales.block_size
    first_block = start // block
    return slice(first, first + count), start, stop, first_block, _blocks(stop, block) if stop > start else first_block


def shard_fp8_experts(full, *, layout: str, gated: bool, rank: int, world_size: int, ep_rank: int = 0,
                      ep_size: int = 1):
    """TP rank `rank`'s (and EP rank `ep_rank`'s) slice of full "fp8_block" weights: its
    intermediate columns by torch.chunk's rule at any world size, the scale blocks they touch
    (a block cut by a shard boundary goes to both sides) and the block offset; whole experts and
    their scales for EP. Copies, as tpmoe.sharding's shards are."""
    experts, start, stop, first_block, last_block = _shard_bounds(full, rank, world_size, ep_rank, ep_size)
    block = full.scales.block_size
    offset = start % block if stop > start else 0  # an empty shard reads no block
    halves = _halves(full.w_gate_up[experts], layout, gated)[:, :, start:stop]
    scales = BlockScales(full.scales.gate_up[experts, :, first_block:last_block].contiguous(),
                         full.scales.down[experts, :, first_block:last_block].contiguous(), block, offset)

    def rows_of(bias):
        if bias is None:
            return None
        return _from_halves(_halves(bias[experts].unsqueeze(-1), layout, gated)[:, :, start:stop], layout,
                            gated).squeeze(-1).contiguous()
    return ExpertWeights(_from_halves(halves, layout, gated).contiguous(),
                         full.w_down[experts, :, start:stop].contiguous(), rows_of(full.b_gate_up),
                         None if full.b_down is None else full.b_down[experts].contiguous(), FP8_FORMAT, scales)


def place_fp8_shard(whole, local, *, layout: str, gated: bool, rank: int, world_size: int, ep_rank: int = 0,
                    ep_size: int = 1) -> None:
    """The inverse of shard_fp8_experts: writes TP rank `rank`'s (and EP rank `ep_rank`'s) slice
    `local` into the whole "fp8_block" experts `whole`, in place (a scale block cut by a shard
    boundary is on both sides, the same)."""
    experts, start, stop, first_block, last_block = _shard_bounds(whole, rank, world_size, ep_rank, ep_size)
    _halves(whole.w_gate_up[experts], layout, gated)[:, :, start:stop] = _halves(local.w_gate_up, layout, gated)
    whole.w_down[experts, :, start:stop] = local.w_down
    whole.scales.gate_up[experts, :, first_block:last_block] = local.scales.gate_up
    whole.scales.down[experts, :, first_block:last_block] = local.scales.down


def check_fp8_experts(weights, *, hidden_size: int, layout: str, gated: bool, device: torch.device,
                      argument: str = "weights") -> Tuple[int, int]:
    """(E, I_p) of "fp8_block" weights after checking the values, the scales and their agreement;
    ValueError / TypeError naming the field, what was expected and what came."""
    check_choice(layout, f"{argument}: layout of fp8_block weights", FP8_LAYOUTS)
    scales = weights.scales
    if not isinstance(scales, BlockScales):
        raise TypeError(f"{argument}.scales: expected a tpmoe.fp8.BlockScales for format {FP8_FORMAT!r}, got "
                        f"{type(scales).__name__}")
    for name in ("w_gate_up", "w_down"):
        value = getattr(weights, name)
        if not isinstance(value, torch.Tensor) or value.dtype != FP8_DTYPE or value.dim() != 3:
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{argument}.{name}: expected a 3-D {FP8_DTYPE} tensor for format {FP8_FORMAT!r}, "
                            f"got {got}")
        if value.device != device:
            raise ValueError(f"{argument}.{name}: expected device {device} (that of hidden_states), got {value.device}")
        if value.requires_grad:
            raise ValueError(f"{argument}.{name}: fp8 expert weights are frozen (no gradient flows into quantized "
                             f"weights; the rest of the model trains), got one that requires grad")
    _check_block_size(scales.block_size, f"{argument}.scales.block_size")
    block, offset = scales.block_size, scales.block_offset
    if not isinstance(offset, int) or not 0 <= offset < block:
        raise ValueError(f"{argument}.scales.block_offset: expected an int in [0, {block}), got {offset!r}")
    num_experts, rows, hidden = weights.w_gate_up.shape
    if hidden != hidden_size:
        raise ValueError(f"{argument}.w_gate_up: expected hidden size {hidden_size} (from hidden_states) on axis 2, "
                         f"got shape {tuple(weights.w_gate_up.shape)}")
    if gated and rows % 2 != 0:
        raise ValueError(f"{argument}.w_gate_up: gated experts need an even gate+up size on axis 1, got shape "
                         f"{tuple(weights.w_gate_up.shape)}")
    inter = rows // 2 if gated else rows
    if tuple(weights.w_down.shape) != (num_experts, hidden, inter):
        raise ValueError(f"{argument}.w_down: expected shape {(num_experts, hidden, inter)} (E, H, I_p from "
                         f"w_gate_up), got {tuple(weights.w_down.shape)}")
    groups, inter_blocks, hidden_blocks = (2 if gated else 1), _blocks(inter, block, offset), _blocks(hidden, block)
    expected = {"gate_up": (num_experts, groups, inter_blocks, hidden_blocks),
                "down": (num_experts, hidden_blocks, inter_blocks)}
    for name, shape in expected.items():
        scale = getattr(scales, name)
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
            got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise TypeError(f"{argument}.scales.{name}: expected a float32 tensor, got {got}")
        if tuple(scale.shape) != shape:
            raise ValueError(f"{argument}.scales.{name}: expected shape {shape} (E, {'G, ' if name == 'gate_up' else ''}"
                             f"blocks of I_p = {inter} at offset {offset}, and of H = {hidden}, block {block}), got "
                             f"{tuple(scale.shape)}")
        if scale.device != device:
            raise ValueError(f"{argument}.scales.{name}: expected device {device}, got {scale.device}")
    return num_experts, inter


def _check_block_size(block_size, argument: str = "block_size") -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"{argument}: expected a positive int, got {block_size!r}")
