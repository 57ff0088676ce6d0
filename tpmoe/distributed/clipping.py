"""`clip_grad_norm_`: the one-process gradient norm of a model whose tpmoe blocks hold slices.

A parallelized MoEBlock keeps this rank's slice of its expert weights as a plain tensor under
the full weight's name, so torch.nn.utils.clip_grad_norm_ sees a different "model" on every
rank: each TP rank sums the squares of its own columns only, and the ranks clip by different
factors (the replicated router copies then drift apart). Here each parameter's squares are
summed over the groups its slices are spread over (MoEBlock.parameter_shardings: the expert
weights over TP and EP, the shared expert's over TP), and counted once where it is replicated,
so every rank gets the norm of the one-process model and the same clipping factor.

Call it where torch's would go: after backward, after tpmoe.allreduce_router_grads (which
completes the replicated gradients of sequence-parallel and expert-parallel blocks) and after
the data-parallel sum (DDP's, or your all-reduce over "dp"). Parameters outside tpmoe blocks
count as replicated, or, as DTensors (torch's own TP styles), by their full norm.
Communication: ONE all-reduce per distinct group (set) the slices live on (TP, EP; EP x TP
weights over both), of one number each.
"""
import math
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from torch import nn


def _local_power(tensor: torch.Tensor, norm_type: float) -> torch.Tensor:
    """sum |t|^p (or max |t| for inf) of a plain tensor, 0 for an empty one (an empty shard)."""
    if tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=tensor.device)
    norm = torch.linalg.vector_norm(tensor, norm_type).double()
    return norm if math.isinf(norm_type) else norm ** norm_type


def _sum_of_powers(grad: torch.Tensor, norm_type: float) -> torch.Tensor:
    """sum |g|^p (max |g| for inf) over the whole gradient: a DTensor's (FSDP2's, torch's TP
    styles') local part reduced over the mesh dimensions it is sharded on, a plain tensor's own."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(grad, DTensor):
        return _local_power(grad, norm_type)
    part = _local_power(grad.to_local(), norm_type)
    for dim, placement in enumerate(grad.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(part, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM,
                            group=grad.device_mesh.get_group(dim))
        elif not placement.is_replicate():
            raise ValueError(f"clip_grad_norm_: a gradient DTensor placed {grad.placements}: expected Shard or "
                             f"Replicate (reduce a Partial gradient first)")
    return part


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clips the gradients of `model`'s parameters in place by the norm of the one-process model's
    gradients (torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) where
    that is below 1); returns that norm (float64 scalar tensor, identical on every rank).
    norm_type: 2.0 (or any p > 0) or inf."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (its tpmoe blocks say how their parameters are "
                        f"sharded), got {type(model).__name__}")
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"norm_type: expected a positive number or inf, got {norm_type}")
    # Every rank builds the same keys whatever its gradients (an EP rank whose experts got no
    # token may have none): the all-reduces below must match across ranks.
    sharded: Dict[Tuple[int, ...], list] = {}
    group_of: Dict[Tuple[int, ...], tuple] = {}
    seen = set()
    for module in model.modules():
        shardings = getattr(module, "parameter_shardings", None)
        if shardings is None:
            continue
        for parameter, groups in shardings():
            seen.add(id(parameter))
            key = tuple(id(group) for group in groups)
            sharded.setdefault(key, []).append(parameter.grad)
            group_of[key] = groups
    replicated = [p.grad for p in model.parameters() if id(p) not in seen and p.grad is not None]
    grads = replicated + [grad for grads in sharded.values() for grad in grads if grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    inf = math.isinf(norm_type)

    def reduce(tensors):
        parts = [_sum_of_powers(t, norm_type).to(device) for t in tensors if t is not None]
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(parts).amax() if inf and parts else torch.stack(parts).sum() if parts else zero

    total = reduce(replicated)
    for key, group_grads in sharded.items():
        part = reduce(group_grads)
        for group in group_of[key]:
            dist.all_reduce(part, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
        total = torch.maximum(total, part) if inf else total + part
    norm = total if math.isinf(norm_type) else total ** (1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is {norm.item()}, "
                           f"not finite (error_if_nonfinite=True)")
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    from torch.distributed.tensor import DTensor
    with torch.no_grad():
        for grad in grads:
            # A DTensor takes a number, not a plain tensor (one host read, only where there are DTensors).
            grad.mul_(coefficient.item() if isinstance(grad, DTensor) else coefficient.to(grad.dtype))
    return norm
