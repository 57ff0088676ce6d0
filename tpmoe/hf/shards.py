"""This rank's tpmoe shard dict from an HF MoE block: full tensors sliced, or the DTensor shards
that transformers' own tensor parallelism already holds (taken as they are when its slicing is
tpmoe's, re-cut otherwise)."""
from typing import Dict, Tuple

import torch


def is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


# The HF parameter axis holding the intermediate columns, and whether gate and up are packed in
# it (split_factor 2), for transformers' TP plan of the concatenated layout.
_HF_SHARD_AXES = {"w_gate_up": (1, 2), "w_down": (2, 1), "shared_gate_up": (0, 1), "shared_down": (1, 1)}


def _local_shard_matches(name: str, tensor, config, world_size: int) -> bool:
    """Whether transformers' DTensor shard of this HF tensor is exactly tpmoe's slice on every rank:
    its placement cuts the intermediate axis (each half of a packed gate/up alike), and the sizes
    then agree, tpmoe.sharding cutting by DTensor's own rule (torch.chunk's)."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

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
    return ok


def _describe(part) -> str:
    if not is_dtensor(part):
        return "a plain tensor"
    mesh = part.device_mesh
    return f"a DTensor {tuple(part.placements)} on a {mesh.ndim}-D mesh {mesh.mesh_dim_names}"


def _full_part(part) -> torch.Tensor:
    """The whole tensor on every rank: plain as it is, Replicate DTensors' local copy, others gathered."""
    if not is_dtensor(part):
        return part.detach()
    if all(placement.is_replicate() for placement in part.placements):
        return part.to_local().detach()
    return part.full_tensor().detach()


def _not_taken(weights, name, parts, block_name: str, why: str) -> ValueError:
    where = ", ".join(f"{block_name + '.' if block_name else ''}{hf_name} ({_describe(part)})"
                      for hf_name, part in zip(weights.names[name], parts))
    return ValueError(f"model: could not take the weight {where} as tpmoe's {name!r}: {why}")


def check_whole_shapes(module, weights, config, block_name: str = "") -> None:
    """Raises ValueError naming the first HF weight (and its placement) whose whole shape is not the
    block's. From global shapes only, so every rank of a group raises together, before any change."""
    from ..weights import expected_shapes

    expected = expected_shapes(config)
    for name, parts in weights.hf_tensors(module).items():
        whole = weights.packing(name).whole_shape(parts)
        if tuple(whole) != expected[name]:
            raise _not_taken(weights, name, parts, block_name,
                             f"its whole shape is {tuple(whole)}, expected {expected[name]} for the block (E "
                             f"{config.num_experts}, H {config.hidden_size}, I {config.intermediate_size})")


def collect_shards(module, weights, config, group, block_name: str = "", *, ep_group=None
                   ) -> Tuple[Dict[str, torch.Tensor], str, frozenset]:
    """This rank's shard dict (tpmoe names) from the HF module's tensors, where it came from, and
    the names whose tensor IS transformers' local shard (a view: the block may keep it uncopied).

    ep_group: the EP group (expert parallelism; plain tensors only, apply refuses DTensors then):
    the routed experts are cut to this EP rank's range before the TP columns.
    weights: the block's tpmoe.hf.weight_map.WeightMap. A TP plan may leave any mix: DTensor
    shards, plain whole tensors (a plan without an entry for, say, the shared expert) and
    DTensors with Replicate placements. Each weight is decided on its own, from global shapes
    and placements only (so every rank takes the same branch): a DTensor shard that is exactly
    tpmoe's slice is taken as it is; anything else is made whole (plain tensors as they are,
    Replicate locally, other DTensors with one full_tensor()) and sliced by tpmoe.sharding.
    Source: "full" (no DTensor), "local shards" (every DTensor was taken as it is), "resharded"
    (at least one was gathered and re-cut).
    """
    from ..distributed import group_rank, group_size
    from ..sharding import SHARDED_NAMES, shard_weight

    rank, world_size = group_rank(group), group_size(group)
    ep = dict(ep_rank=group_rank(ep_group), ep_size=group_size(ep_group))
    shards, kinds, views = {}, set(), set()
    for name, parts in weights.hf_tensors(module).items():
        try:
            if ep["ep_size"] == 1 and name in SHARDED_NAMES and weights.plain(name) and all(
                    is_dtensor(p) and _local_shard_matches(name, p, config, world_size) for p in parts):
                locals_ = [p.to_local().detach() for p in parts]
                shards[name] = torch.cat(locals_) if len(locals_) > 1 else locals_[0]
                kinds.add("local")
                if len(locals_) == 1:
                    views.add(name)
            else:
                full = [_full_part(p) for p in parts]
                whole = weights.to_tpmoe(name, full)
                shards[name] = shard_weight(config, name, whole, rank, world_size, **ep)
                if any(is_dtensor(p) and not all(pl.is_replicate() for pl in p.placements) for p in parts):
                    kinds.add("gathered")
        except Exception as error:  # re-raised naming the weight and its placement
            where = f"rank {rank} of {world_size}" + (f", EP rank {ep['ep_rank']} of {ep['ep_size']}"
                                                      if ep["ep_size"] > 1 else "")
            raise _not_taken(weights, name, parts, block_name, f"{where}: {type(error).__name__}: {error}") from error
    source = "resharded" if "gathered" in kinds else "local shards" if "local" in kinds else "full"
    return shards, source, frozenset(views)


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
