"""This rank's tpmoe shard dict from an HF MoE block: full tensors sliced, or the DTensor shards
that transformers' own tensor parallelism already holds (taken as they are when its slicing is
tpmoe's, re-cut otherwise)."""
from typing import Dict, List, Tuple

import torch


def is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def _chunk_sizes(total: int, world_size: int) -> List[int]:
    """Sizes DTensor's Shard gives each rank (torch.chunk: ceil-sized chunks, the last ones short)."""
    chunk = -(-total // world_size)
    return [max(0, min(chunk, total - rank * chunk)) for rank in range(world_size)]


# The HF parameter axis holding the intermediate columns, and whether gate and up are packed in
# it (split_factor 2), for transformers' TP plan of the concatenated layout.
_HF_SHARD_AXES = {"w_gate_up": (1, 2), "w_down": (2, 1), "shared_gate_up": (0, 1), "shared_down": (1, 1)}


def _local_shard_matches(name: str, tensor, config, world_size: int) -> bool:
    """Whether transformers' DTensor shard of this HF tensor is exactly tpmoe's slice on every rank."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    from ..sharding import shard_sizes

    if name not in _HF_SHARD_AXES or config.layout != "concatenated" or not config.gated:
        return False
    axis, split_factor = _HF_SHARD_AXES[name]
    if tensor.device_mesh.ndim != 1 or len(tensor.placements) != 1:
        return False
    placement = tensor.placements[0]
    if split_factor == 1:
        ok = type(placement) is Shard and placement.dim % tensor.ndim == axis
    else:
        ok = isinstance(placement, _StridedShard) and placement.dim % tensor.ndim == axis \
            and placement.split_factor == split_factor
    if not ok:
        return False
    intermediate = tensor.shape[axis] // split_factor
    return _chunk_sizes(intermediate, world_size) == shard_sizes(intermediate, world_size)


def collect_shards(module, pattern, config, group) -> Tuple[Dict[str, torch.Tensor], str]:
    """This rank's shard dict (tpmoe names) from the HF block's tensors, and where it came from."""
    from ..distributed import group_rank, group_size
    from ..sharding import SHARDED_NAMES, shard_moe_weights
    from .families import hf_tensors_of

    rank, world_size = group_rank(group), group_size(group)
    hf = hf_tensors_of(module, pattern)
    dtensor_names = [name for name, parts in hf.items() if any(is_dtensor(part) for part in parts)]
    if not dtensor_names:
        full = {name: torch.cat([p.detach() for p in parts]) if len(parts) > 1 else parts[0].detach()
                for name, parts in hf.items()}
        return shard_moe_weights(config, full, rank, world_size), "full"

    def full_tensor(part):
        return part.full_tensor().detach() if is_dtensor(part) else part.detach()

    local_ok = all(_local_shard_matches(name, part, config, world_size)
                   for name in SHARDED_NAMES if name in hf for part in hf[name]) and all(
        not is_dtensor(part) or all(p.is_replicate() for p in part.placements)
        for name in hf if name not in SHARDED_NAMES for part in hf[name])
    if local_ok:
        shards = {}
        for name, parts in hf.items():
            locals_ = [p.to_local().detach() if is_dtensor(p) else p.detach() for p in parts]
            shards[name] = torch.cat(locals_) if len(locals_) > 1 else locals_[0]
        return shards, "local shards"
    # Every rank takes this branch together (decided from global shapes and placements only).
    full = {name: torch.cat([full_tensor(p) for p in parts]) if len(parts) > 1 else full_tensor(parts[0])
            for name, parts in hf.items()}
    return shard_moe_weights(config, full, rank, world_size), "resharded"


def dtensor_group(module):
    """The process group of the TP mesh that transformers sharded this block's experts over, or None."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if is_dtensor(tensor):
            mesh = tensor.device_mesh
            if mesh.ndim != 1:
                raise ValueError(f"model: expert DTensor on a {mesh.ndim}-D mesh {mesh.mesh_dim_names}; "
                                 f"expected transformers' 1-D TP mesh")
            return mesh.get_group()
    return None
