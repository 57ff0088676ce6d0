"""Collectives on what every rank of the TP group holds whole or must agree on: the checks that
it agrees (replicated tensors each step, the shards at construction), the per-step gradient sum
of sequence-parallel mode, and the one gather that rebuilds full weights."""
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .._checks import FLOAT_DTYPES, dtype_name
from ..config import ACTIVATIONS, LAYOUTS, SCORINGS, MoEConfig
from ..sharding import REPLICATED_NAMES, SHARDED_NAMES, assemble_full, check_shards, shard_shapes
from .groups import (all_gather_single, collective_device, communicates, group_rank, group_size,
                     naming_collective_failures)

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _all_gather_named(local: Dict[str, torch.Tensor], group, what: str) -> List[Dict[str, torch.Tensor]]:
    """Every rank's named int64 vectors (the same names and lengths on every rank), one dict per
    rank, on the CPU. Communication: ONE all-gather of their concatenation."""
    names = list(local)
    lengths = [local[name].numel() for name in names]
    flat = torch.cat([local[name].reshape(-1) for name in names])
    world_size = group_size(group)
    gathered = flat.new_empty(world_size * flat.numel())
    with naming_collective_failures(what, group):
        all_gather_single(gathered, flat, group=group)
    rows = gathered.view(world_size, flat.numel()).cpu()
    return [dict(zip(names, row.split(lengths))) for row in rows]


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
    # Keyed by position, so that no tensor name can collide with the token count's key.
    local = {index: _bit_checksum(tensors[name]).to(device) for index, name in enumerate(names)}
    if local_tokens is not None:
        local["local_tokens"] = torch.tensor([local_tokens], dtype=torch.int64, device=device)
    rows = _all_gather_named(local, group, what)
    world_size = len(rows)
    seen_from = f"seen from rank {group_rank(group)}"
    if local_tokens is not None:
        counts = [int(row["local_tokens"]) for row in rows]
        expected = list(tokens_per_rank) if tokens_per_rank is not None else [counts[0]] * world_size
        for rank, (count, wanted) in enumerate(zip(counts, expected)):
            if count != wanted:
                hint = (f"tokens_per_rank says {wanted}" if tokens_per_rank is not None else
                        f"rank 0 holds {counts[0]}; uneven counts need tokens_per_rank={counts}")
                raise ValueError(f"{what}: rank {rank} of the TP group holds {count} tokens but {hint} ({seen_from})")
    for rank in range(1, world_size):
        for index, name in enumerate(names):
            if not torch.equal(rows[rank][index], rows[0][index]):
                raise ValueError(
                    f"{what}: {name} on rank {rank} of the TP group differs from rank 0 ({seen_from}); the "
                    f"ranks need the same {name} (same input batch in tensor-parallel mode, same replicated "
                    f"weights in both modes)")


# What every rank of a TP group must agree on besides the shard shapes; the three string fields
# travel as their index in the config's tuple of choices.
_AGREED_FIELDS = ("hidden_size", "intermediate_size", "num_experts", "top_k", "shared_intermediate_size", "gated",
                  "layout", "scoring", "activation", "expert_bias", "router_bias", "correction_bias",
                  "shared_expert_gate", "external_router", "weights_on_input")
_CODED_FIELDS = {"layout": LAYOUTS, "scoring": SCORINGS, "activation": ACTIVATIONS}
# Every shape travels padded with -1 to the most dimensions of any weight (the 3-D expert
# weights), and every weight name has its slot, so every rank sends a vector of one length.
_WEIGHT_DIMS = 3


def _agreement_fields(config: MoEConfig, shapes: Dict[str, tuple], dtype, shard_unit: int, local_ok: bool,
                      device: torch.device) -> Dict[str, torch.Tensor]:
    fields = {"local_ok": [int(local_ok)], "shard_unit": [shard_unit],
              "dtype": [FLOAT_DTYPES.index(dtype) if dtype in FLOAT_DTYPES else -1]}
    for name in _AGREED_FIELDS:
        value = getattr(config, name)
        fields[name] = [_CODED_FIELDS[name].index(value) if name in _CODED_FIELDS else int(value)]
    for name in REPLICATED_NAMES + SHARDED_NAMES:
        shape = list(shapes.get(name, ()))
        fields[name] = shape + [-1] * (_WEIGHT_DIMS - len(shape))
    return {key: torch.tensor(values, dtype=torch.int64, device=device) for key, values in fields.items()}


def check_shards_agree(config: MoEConfig, shapes: Dict[str, tuple], dtype, group, shard_unit: int = 1, *,
                       local_ok: bool = True, what: str = "MoEBlock") -> None:
    """Raises ValueError on EVERY rank of `group` unless all ranks hold shards of one block: the
    same config (full sizes, layout, scoring, activation, biases), shard_unit and dtype, and each rank
    the shard shapes that config gives its rank. `local_ok=False` says this rank already rejected
    its own shards (it then raises its own error): the others learn it here and raise too, instead
    of waiting in the block's first collective until the process group's timeout.

    Shards that each pass check_shards can still disagree across ranks (a rank built with another
    intermediate_size, shard_unit or dtype): the block would then run, and its all-reduce would sum
    garbage, fail on mismatched sizes, or hang. Communication: ONE all-gather of ~45 int64.
    """
    world_size, rank = group_size(group), group_rank(group)
    if world_size < 2:
        return
    local = _agreement_fields(config, shapes, dtype, shard_unit, local_ok, collective_device(group))
    rows = [{key: value.tolist() for key, value in row.items()} for row in _all_gather_named(
        local, group, f"{what}: the construction-time check that the ranks' shards agree")]
    if not local_ok:
        return  # the caller raises this rank's own error
    seen_from = f"seen from rank {rank}"
    failed = [p for p, row in enumerate(rows) if not row["local_ok"][0]]
    if failed:
        raise ValueError(f"{what}: rank {failed[0]} of the TP group rejected its shards (its own error says why); "
                         f"every rank stops here so that none waits in a later collective ({seen_from})")
    first = rows[0]
    for p, row in enumerate(rows[1:], start=1):
        for name in _AGREED_FIELDS:
            if row[name] != first[name]:
                decode = (lambda v, n=name: _CODED_FIELDS[n][v]) if name in _CODED_FIELDS else (lambda v: v)
                raise ValueError(
                    f"{what}: rank {p} of the TP group was built with config.{name}={decode(row[name][0])!r} but "
                    f"rank 0 with {decode(first[name][0])!r}; every rank needs the same MoEConfig (full sizes) "
                    f"({seen_from})")
        if row["shard_unit"] != first["shard_unit"]:
            raise ValueError(f"{what}: rank {p} of the TP group uses shard_unit={row['shard_unit'][0]} but rank 0 "
                             f"shard_unit={first['shard_unit'][0]}; the shard sizes then differ ({seen_from})")
        if row["dtype"] != first["dtype"]:
            names = {code: dtype_name(d) for code, d in enumerate(FLOAT_DTYPES)}
            raise ValueError(f"{what}: rank {p} of the TP group holds {names.get(row['dtype'][0], 'other')} weights "
                             f"but rank 0 {names.get(first['dtype'][0], 'other')}; the ranks' partial outputs "
                             f"must share one dtype ({seen_from})")
    for p, row in enumerate(rows):
        for name, shape in shard_shapes(config, p, world_size, shard_unit).items():
            got = tuple(d for d in row[name] if d >= 0) or None
            if got != shape:
                raise ValueError(
                    f"{what}: the shards of rank {p} of the TP group do not fit together: {name} has shape "
                    f"{got} there, expected {shape} for rank {p} of world size {world_size} "
                    f"(intermediate_size {config.intermediate_size}, shard_unit {shard_unit}) ({seen_from})")


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


def gather_full(config: MoEConfig, local_shards: Dict[str, torch.Tensor], group, shard_unit: int = 1,
                ) -> Dict[str, torch.Tensor]:
    """Full weights on every rank from each rank's shards, with ONE all-gather over `group`.

    `group` None means one process: the local shards are the full weights (returned as copies).
    """
    world_size, rank = group_size(group), group_rank(group)
    check_shards(config, local_shards, rank, world_size, shard_unit, argument="local_shards")
    if world_size == 1:
        return assemble_full(config, [local_shards], shard_unit)
    names = [name for name in SHARDED_NAMES if name in local_shards]
    shapes_per_rank = [[shard_shapes(config, p, world_size, shard_unit)[name] for name in names]
                       for p in range(world_size)]
    gathered = all_gather_tensor_lists([local_shards[name].detach() for name in names], shapes_per_rank, group)
    shards_per_rank = []
    for p in range(world_size):
        shards = {name: local_shards[name].detach() for name in local_shards if name not in names}
        shards.update(zip(names, gathered[p]))
        shards_per_rank.append(shards)
    return assemble_full(config, shards_per_rank, shard_unit)
