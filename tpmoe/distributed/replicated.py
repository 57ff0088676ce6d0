"""Collectives on what every rank of the TP group holds whole: a check that it agrees, the
per-step gradient sum of sequence-parallel mode, and the one gather that rebuilds full weights."""
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .groups import all_gather_single, communicates, group_rank, group_size, naming_collective_failures

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 sums of the tensor's bit patterns (plain and position-weighted): exact and
    independent of summation order, so equal tensors give equal checksums on any device, and a
    changed or moved element changes them."""
    flat = tensor.detach().contiguous().reshape(-1)
    bits = flat.view(_INT_VIEW[flat.element_size()]).to(torch.int64)
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 8191 + 1
    return torch.stack([bits.sum(), (bits * weights).sum(), torch.tensor(flat.numel(), device=flat.device)])


def check_replicated(tensors: Dict[str, torch.Tensor], group, what: str = "check_replicated", *,
                     local_tokens: Optional[int] = None, tokens_per_rank: Optional[Sequence[int]] = None) -> None:
    """Raises ValueError on every rank (so no rank is left waiting in a later collective), naming
    the first rank that differs from rank 0, unless every named tensor is bitwise equal on every
    rank of `group`.

    Sequence-parallel mode passes `local_tokens` too (the rank's token count): the counts must
    then equal `tokens_per_rank` when given, or each other when not.
    Communication: ONE all-gather of 3 int64 per tensor (+1 for the token count).
    """
    if not communicates(group):
        return
    names = list(tensors)
    device = next(iter(tensors.values())).device
    parts = [_bit_checksum(tensors[name]).to(device) for name in names]
    if local_tokens is not None:
        parts.append(torch.tensor([local_tokens], dtype=torch.int64, device=device))
    local = torch.cat(parts)
    world_size = group_size(group)
    gathered = local.new_empty(world_size * local.numel())
    with naming_collective_failures(what, group):
        all_gather_single(gathered, local, group=group)
    gathered = gathered.view(world_size, local.numel()).cpu()
    seen_from = f"seen from rank {group_rank(group)}"
    if local_tokens is not None:
        counts = gathered[:, -1].tolist()
        expected = list(tokens_per_rank) if tokens_per_rank is not None else [counts[0]] * world_size
        for rank, (count, wanted) in enumerate(zip(counts, expected)):
            if count != wanted:
                hint = (f"tokens_per_rank says {wanted}" if tokens_per_rank is not None else
                        f"rank 0 holds {counts[0]}; uneven counts need tokens_per_rank={counts}")
                raise ValueError(f"{what}: rank {rank} of the TP group holds {count} tokens but {hint} ({seen_from})")
        gathered = gathered[:, :-1]
    for rank in range(1, world_size):
        differs = (gathered[rank] != gathered[0]).view(len(names), 3).any(dim=1)
        if bool(differs.any()):
            name = names[int(differs.nonzero()[0])]
            raise ValueError(
                f"{what}: {name} on rank {rank} of the TP group differs from rank 0 ({seen_from}); the "
                f"ranks need the same {name} (same input batch in tensor-parallel mode, same replicated "
                f"weights in both modes)")


def allreduce_gradients(parameters: Sequence[torch.Tensor], group) -> int:
    """Sums the .grad of `parameters` over `group` in ONE all-reduce (flattened; promoted dtype).
    Parameters without a gradient are skipped (the same on every rank, by construction of the
    callers). Returns how many gradients were summed."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or not communicates(group):
        return len(grads)
    dtype = grads[0].dtype
    for grad in grads[1:]:
        dtype = torch.promote_types(dtype, grad.dtype)
    buffer = torch.cat([grad.reshape(-1).to(dtype) for grad in grads])
    with naming_collective_failures("allreduce_router_grads / allreduce_gradients: the all-reduce of the "
                                    "replicated parameters' gradients", group):
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for grad in grads:
        grad.copy_(buffer[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return len(grads)


def allreduce_router_grads(modules_or_model, group=None) -> int:
    """Once per step, after backward: sums over the TP group the gradients that sequence-parallel
    blocks compute from their own tokens only: router weight and bias, shared-expert gate, routed
    down bias (the replicated parameters). ONE all-reduce for all blocks together.

    modules_or_model: a module (searched recursively) or an iterable of modules. Only blocks in
    sequence-parallel mode contribute; tensor-parallel blocks already hold complete gradients
    (summing them again would multiply them by the world size). group: the TP group; None takes
    the blocks' own group (they must share one). Returns how many gradients were summed.
    """
    modules = [modules_or_model] if isinstance(modules_or_model, torch.nn.Module) else list(modules_or_model)
    parameters, groups = [], []
    for module in modules:
        for sub in module.modules():
            summed = getattr(sub, "sequence_parallel_summed_parameters", None)
            if summed is None:
                continue
            params = summed()
            if params:
                parameters.extend(params)
                groups.append(sub.group)
    if not parameters:
        return 0
    if group is None:
        group = groups[0]
        if any(g is not group for g in groups):
            raise ValueError("group: the sequence-parallel blocks use different process groups; pass the TP group")
    else:
        from .groups import resolve_tp_group
        group = resolve_tp_group(group)
    return allreduce_gradients(parameters, group)


def all_gather_tensor_lists(local_tensors: List[torch.Tensor], shapes_per_rank: List[List[tuple]],
                            group) -> List[List[torch.Tensor]]:
    """Every rank's list of tensors (same dtypes everywhere; shapes may differ per rank, known to
    all as shapes_per_rank[rank][i]) with ONE all-gather of their bytes, padded to the longest."""
    world_size = group_size(group)
    itemsizes = [t.element_size() for t in local_tensors]

    def nbytes(shapes):
        return sum(int(torch.Size(s).numel()) * size for s, size in zip(shapes, itemsizes))

    padded = max(nbytes(shapes) for shapes in shapes_per_rank)
    local = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in local_tensors]
                      + [torch.zeros(0, dtype=torch.uint8, device=local_tensors[0].device)])
    local = torch.cat([local, local.new_zeros(padded - local.numel())])
    gathered = local.new_empty(world_size * padded)
    with naming_collective_failures("gather_full: the all-gather of every rank's shards", group):
        all_gather_single(gathered, local, group=group)
    gathered = gathered.view(world_size, padded)
    out = []
    for rank, shapes in enumerate(shapes_per_rank):
        tensors, offset = [], 0
        for shape, like in zip(shapes, local_tensors):
            count = int(torch.Size(shape).numel()) * like.element_size()
            # The clone gives the dtype view an aligned start.
            tensors.append(gathered[rank, offset:offset + count].clone().view(like.dtype).view(shape))
            offset += count
        out.append(tensors)
    return out
