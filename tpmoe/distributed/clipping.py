"""`clip_grad_norm_`: the one-process gradient norm of a model with parallel tpmoe blocks.

A parallel MoEBlock's parameters are DTensors (tpmoe.distributed.dtensor_parameters), so their
gradients say which ranks hold which slice: each gradient's sum of powers is reduced over the
mesh dimensions it is sharded on (TP columns, EP experts, FSDP2's "dp" shards) and counted once
where it is replicated, so every rank gets the norm of the one-process model and the same factor.
torch.nn.utils.clip_grad_norm_ does the same while every parameter is a DTensor on one mesh; a
model mixing plain parameters (an unsharded embedding) or meshes (EP blocks beside TP attention)
needs this one. Plain parameters count as replicated.

Call it where torch's would go: after backward, after tpmoe.allreduce_router_grads (which
completes the replicated gradients of sequence-parallel and expert-parallel blocks) and after
the data-parallel sum (FSDP2's, DDP's, or your all-reduce over "dp").
Communication: ONE all-reduce per distinct set of groups the gradients are sharded over, of one
number each.
"""
import math
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .dtensor_parameters import local_tensor


def _local_power(tensor: torch.Tensor, norm_type: float) -> torch.Tensor:
    """sum |t|^p (or max |t| for inf) of a plain tensor, 0 for an empty one (an empty shard)."""
    if tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=tensor.device)
    norm = torch.linalg.vector_norm(tensor, norm_type).double()
    return norm if math.isinf(norm_type) else norm ** norm_type


def _sharded_over(parameter: torch.Tensor) -> tuple:
    """The process groups of the mesh dimensions a DTensor parameter (and its gradient) is sharded
    on, in mesh order; () for a plain or replicated one."""
    if not isinstance(parameter, DTensor):
        return ()
    groups = []
    for dim, placement in enumerate(parameter.placements):
        if placement.is_partial():
            raise ValueError(f"clip_grad_norm_: a parameter DTensor placed {parameter.placements}: expected Shard or "
                             f"Replicate")
        if not placement.is_replicate():  # Shard, or FSDP2's _StridedShard over a dimension EP shards too
            groups.append(parameter.device_mesh.get_group(dim))
    return tuple(groups)


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clips the gradients of `model`'s parameters in place by the norm of the one-process model's
    gradients (torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) where
    that is below 1); returns that norm (float64 scalar tensor, identical on every rank).
    norm_type: 2.0 (or any p > 0) or inf."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"norm_type: expected a positive number or inf, got {norm_type}")
    # Keys from the parameters, not their gradients, in model order: every rank builds the same ones
    # even where it has no gradient (an EP rank whose experts got no token), so the all-reduces
    # below match across ranks.
    by_groups: Dict[Tuple[int, ...], list] = {}
    groups_of: Dict[Tuple[int, ...], tuple] = {}
    for parameter in model.parameters():
        groups = _sharded_over(parameter)
        key = tuple(id(group) for group in groups)
        by_groups.setdefault(key, []).append(parameter.grad)
        groups_of[key] = groups
    grads = [grad for group_grads in by_groups.values() for grad in group_grads if grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    inf = math.isinf(norm_type)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for key, group_grads in by_groups.items():
        parts = [_local_power(local_tensor(grad), norm_type).to(device) for grad in group_grads if grad is not None]
        part = (torch.stack(parts).amax() if inf else torch.stack(parts).sum()) if parts else torch.zeros_like(total)
        for group in groups_of[key]:
            dist.all_reduce(part, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
        total = torch.maximum(total, part) if inf else total + part
    norm = total if math.isinf(norm_type) else total ** (1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is {norm.item()}, "
                           f"not finite (error_if_nonfinite=True)")
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    with torch.no_grad():
        for grad in grads:
            # A DTensor takes a number, not a plain tensor (one host read, only where there are DTensors).
            grad.mul_(coefficient.item() if isinstance(grad, DTensor) else coefficient.to(grad.dtype))
    return norm
