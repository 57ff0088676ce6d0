"""A parallel MoEBlock's parameters as DTensors on its mesh, with the full weights' global shapes.

Each parameter is this rank's stacked slice (tpmoe.stacked) wrapped, without a copy, in a
DTensor whose placements say how the full weight is split, so that torch's own tools see the
one-process model: FSDP2 shards it further over "dp", torch.distributed.checkpoint saves and
reloads it at any other layout, clip_grad_norm_ reduces each norm over the right ranks, and
`full_tensor()` is the full weight. On the block's mesh (its EP and/or TP dimensions):

  routed experts (w_gate_up, b_gate_up, w_down)   Shard(0) on "ep", Shard(I axis) on "tp"
  shared expert (shared_gate_up, shared_down)     Replicate on "ep", Shard(Is axis) on "tp"
  router, biases, shared gate, correction bias    Replicate

tpmoe.sharding cuts by torch.chunk's rule, DTensor's own for uneven shards, so the local
tensors are exactly the DTensors' local shards. The kernels take `to_local()` views: the
block's collectives are its own, unchanged, and DTensor runs none in forward or backward.
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from ..config import MoEConfig
from ..sharding import EXPERT_SHARDED_NAMES, SHARDED_NAMES
from ..stacked import EXPERT_AXIS, stacked_shape, tp_axis
from ..weights import expected_shapes
from .groups import EP_DIM_NAME, TP_DIM_NAME, collective_device


def _contiguous_strides(shape) -> Tuple[int, ...]:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


def mesh_of_groups(tp_group, ep_group) -> Optional[Tuple[DeviceMesh, Tuple[str, ...]]]:
    """(the block's mesh, the role of each dimension) built from ProcessGroups, for a block given
    groups rather than a DeviceMesh; None for one process. An EP x TP mesh needs every rank's TP
    group: ONE all_gather_object over the EP group (at construction only)."""
    groups = [(EP_DIM_NAME, ep_group), (TP_DIM_NAME, tp_group)]
    groups = [(name, group) for name, group in groups if group is not None]
    if not groups:
        return None
    device_type = collective_device(groups[0][1]).type
    if len(groups) == 1:
        name, group = groups[0]
        return DeviceMesh.from_group(group, device_type, mesh_dim_names=(name,)), (name,)
    rows: List[Optional[List[int]]] = [None] * dist.get_world_size(ep_group)
    dist.all_gather_object(rows, dist.get_process_group_ranks(tp_group), group=ep_group)
    mesh = DeviceMesh.from_group([ep_group, tp_group], device_type, mesh=torch.tensor(rows),
                                 mesh_dim_names=(EP_DIM_NAME, TP_DIM_NAME))
    return mesh, (EP_DIM_NAME, TP_DIM_NAME)


def block_submesh(mesh: DeviceMesh, tp_dim, ep_dim) -> Tuple[DeviceMesh, Tuple[str, ...]]:
    """(the dimensions of the user's `mesh` the block runs on, the role of each): a slice of it in
    the mesh's own order, so that FSDP2 over another dimension of the same mesh sees a common
    parent. tp_dim / ep_dim: names or indices (None: not used); a 1-D mesh with neither is TP."""
    if tp_dim is None and ep_dim is None:
        return mesh, (TP_DIM_NAME,)
    names = tuple(mesh.mesh_dim_names or ())
    role_of = {}
    for role, dim in ((EP_DIM_NAME, ep_dim), (TP_DIM_NAME, tp_dim)):
        if dim is not None:
            role_of[names[dim] if isinstance(dim, int) else dim] = role
    chosen = tuple(name for name in names if name in role_of)
    roles = tuple(role_of[name] for name in chosen)
    if chosen == names:
        return mesh, roles
    return (mesh[chosen] if len(chosen) > 1 else mesh[chosen[0]]), roles


def placements(config: MoEConfig, name: str, roles) -> Tuple[Placement, ...]:
    """The placements of parameter `name` on a block mesh whose dimensions have these roles."""
    result = []
    for dim_name in roles:
        if dim_name == EP_DIM_NAME and name in EXPERT_SHARDED_NAMES:
            result.append(Shard(EXPERT_AXIS))
        elif dim_name == TP_DIM_NAME and name in SHARDED_NAMES:
            result.append(Shard(tp_axis(config, name)))
        else:
            result.append(Replicate())
    return tuple(result)


def as_dtensor(config: MoEConfig, name: str, local_stacked: torch.Tensor, mesh: DeviceMesh,
               roles: Tuple[str, ...]) -> DTensor:
    """This rank's stacked slice of `name` as a DTensor of the full weight's global shape (no copy)."""
    global_shape = stacked_shape(config, name, expected_shapes(config)[name])
    return DTensor.from_local(local_stacked, mesh, placements(config, name, roles), run_check=False,
                              shape=torch.Size(global_shape), stride=_contiguous_strides(global_shape))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (differentiable), a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def block_local(tensor: torch.Tensor, block_mesh: Optional[DeviceMesh]) -> torch.Tensor:
    """This rank's slice of a block's parameter or gradient over the block's own mesh dimensions:
    the local tensor, after gathering the dimensions someone else added (FSDP2's "dp" shards of a
    parameter it manages: ONE all-gather per such parameter; none otherwise). Not differentiable."""
    if isinstance(tensor, DTensor):
        own = set((block_mesh.mesh_dim_names or ()) if block_mesh is not None else ())
        names = tensor.device_mesh.mesh_dim_names or ()
        if any(name not in own for name in names):
            wanted = [p if name in own else Replicate() for name, p in zip(names, tensor.placements)]
            tensor = tensor.redistribute(tensor.device_mesh, wanted)
        tensor = tensor.to_local()
    return tensor.detach()
