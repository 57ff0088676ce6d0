"""A MoEBlock's routed experts held quantized (tpmoe.fp8's "fp8_block", tpmoe.mxfp4's "mxfp4"):
this rank's slice of them, frozen, as MoEBlock.load_quantized_experts_ puts them in place of the
dense w_gate_up / w_down.

The stored tensors are kept as integer views (fp8 values as uint8, float32 scales as int32) so
that a dtype cast of the block (`block.to(torch.bfloat16)`, FSDP2's mixed precision) moves them
but never converts them; they are viewed back, free, when the experts run. They are buffers
outside the state dict (persistent=False): a quantized checkpoint is loaded whole through
load_quantized_experts_, and tpmoe's own checkpoints hold the trained parameters around them.
"""
import torch
from torch import nn

from .fp8 import FP8_DTYPE, BlockScales
from .sharding import expert_range
from .weights import FP8_FORMAT, ExpertWeights


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """An integer view of a stored tensor: no dtype cast of a module converts it."""
    if tensor.dtype == FP8_DTYPE:
        return tensor.view(torch.uint8)
    if tensor.dtype == torch.float32:
        return tensor.view(torch.int32)
    return tensor


def dense_expert_placeholders(shapes, dtype: torch.dtype, device) -> dict:
    """Zero-stride stand-ins (no memory of their own) for a block's dense w_gate_up / w_down of
    these shapes, where its experts are quantized: they meet the placement's shape and agreement
    checks and are never copied (MoEBlock._place with `quantized`)."""
    return {name: torch.zeros((), dtype=dtype, device=device).expand(shapes[name]) for name in ("w_gate_up", "w_down")}


class QuantizedExperts(nn.Module):
    """One rank's slice of quantized routed experts: what tpmoe.routed_experts takes, without the
    biases (they stay the block's trained parameters)."""

    def __init__(self, local: ExpertWeights):
        super().__init__()
        self.format = local.format
        self.block_size, self.block_offset = local.scales.block_size, local.scales.block_offset
        for name, tensor in (("w_gate_up", local.w_gate_up), ("w_down", local.w_down),
                             ("gate_up_scale", local.scales.gate_up), ("down_scale", local.scales.down)):
            self.register_buffer(name, _stored(tensor.detach()), persistent=False)

    def weights(self, b_gate_up=None) -> ExpertWeights:
        values_gate_up, values_down, scales_gate_up, scales_down = self.unstored(self.stored())
        return ExpertWeights(values_gate_up, values_down, b_gate_up, None, self.format,
                             BlockScales(scales_gate_up, scales_down, self.block_size, self.block_offset))

    def unstored(self, stored) -> list:
        """Four tensors in the stored dtypes (this rank's or the whole experts') viewed back as the
        format holds them (fp8: e4m3 values and float32 scales), free."""
        if self.format != FP8_FORMAT:
            return list(stored)
        return [stored[0].view(FP8_DTYPE), stored[1].view(FP8_DTYPE), stored[2].view(torch.float32),
                stored[3].view(torch.float32)]

    def extra_repr(self) -> str:
        return f"format={self.format}, block={self.block_size}, offset={self.block_offset}"

    def stored(self) -> list:
        """The four stored tensors as kept (integer views): values of gate_up and down, their scales."""
        return [self.w_gate_up, self.w_down, self.gate_up_scale, self.down_scale]

    def as_experts(self, stored) -> ExpertWeights:
        """Four tensors of this format in the stored dtypes (whole or a slice) as ExpertWeights, as
        the sharding functions take them (they only cut and place)."""
        return ExpertWeights(stored[0], stored[1], None, None, self.format, BlockScales(stored[2], stored[3],
                                                                                          self.block_size, 0))


def _whole_shapes(local: QuantizedExperts, config, num_experts: int) -> list:
    """The stored tensors' shapes for `num_experts` whole experts of `config` in local's format."""
    hidden, inter = config.hidden_size, config.intermediate_size
    rows = (2 if config.gated else 1) * inter
    block = local.block_size

    def blocks(size):
        return -(-size // block)
    if local.format == FP8_FORMAT:
        return [(num_experts, rows, hidden), (num_experts, hidden, inter),
                (num_experts, 2 if config.gated else 1, blocks(inter), blocks(hidden)),
                (num_experts, blocks(hidden), blocks(inter))]
    return [(num_experts, rows, blocks(hidden), 16), (num_experts, hidden, blocks(inter), 16),
            (num_experts, rows, blocks(hidden)), (num_experts, hidden, blocks(inter))]


def gather_whole_quantized_experts(local: QuantizedExperts, spec, config, tp_group, ep_group) -> ExpertWeights:
    """The whole quantized experts on every rank from each rank's slice `local` of a block of
    `config` (TP group tp_group, EP group ep_group; None: one process): ONE all-gather of the
    slices' bytes over the TP group and, with EP, one more over the EP group; bitwise the experts
    the block was given (MoEBlock.load_quantized_experts_ cut them, tpmoe.quantized places each
    slice back)."""
    from .distributed.groups import group_rank, group_size
    from .distributed.replicated import all_gather_tensor_lists
    from .quantized import place_quantized_shard, shard_quantized_experts

    tp_size, ep_size, ep_rank = group_size(tp_group), group_size(ep_group), group_rank(ep_group)
    _, count = expert_range(config.num_experts, ep_rank, ep_size)
    device = local.w_gate_up.device
    stored = [tensor.detach() for tensor in local.stored()]
    dtypes = [tensor.dtype for tensor in stored]
    if tp_size == 1:
        mine = [tensor.clone() for tensor in stored]
    else:
        meta = local.as_experts([torch.empty(shape, dtype=dtype, device="meta")
                                 for shape, dtype in zip(_whole_shapes(local, config, count), dtypes)])
        shapes_per_rank = [[tuple(t.shape) for t in _tensors(shard_quantized_experts(meta, spec, tp_rank=r,
                                                                                   tp_size=tp_size))]
                           for r in range(tp_size)]
        slices = all_gather_tensor_lists(stored, shapes_per_rank, tp_group)
        mine = [torch.empty(shape, dtype=dtype, device=device)
                for shape, dtype in zip(_whole_shapes(local, config, count), dtypes)]
        for rank, tensors in enumerate(slices):
            place_quantized_shard(local.as_experts(mine), local.as_experts(tensors), spec, tp_rank=rank,
                                  tp_size=tp_size)
    if ep_size > 1:
        shapes_per_ep = [[(expert_range(config.num_experts, e, ep_size)[1],) + tuple(t.shape[1:]) for t in mine]
                         for e in range(ep_size)]
        per_ep = all_gather_tensor_lists(mine, shapes_per_ep, ep_group)
        mine = [torch.cat([per_ep[e][i] for e in range(ep_size)]) for i in range(len(mine))]
    return local.as_experts(local.unstored(mine))


def _tensors(experts: ExpertWeights) -> list:
    return [experts.w_gate_up, experts.w_down, experts.scales.gate_up, experts.scales.down]
