"""Collectives on what every rank of the TP group holds whole or must agree on: the checks that
it agrees (replicated tensors each step, the shards at construction), the per-step gradient sum
of sequence-parallel mode, and the one gather that rebuilds full weights."""
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .._checks import FLOAT_DTYPES, dtype_name
from ..config import ACTIVATIONS, LAYOUTS, SCORINGS, MoEConfig
from ..sharding import (EXPERT_SHARDED_NAMES, REPLICATED_NAMES, SHARDED_NAMES, assemble_full, check_shards,
                        shard_shapes)
from .dtensor_parameters import local_tensor
from .groups import (all_gather_single, collective_device, communicates, group_rank, group_size,
                     naming_collective_failures)

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _all_gather_named(local: Dict[str, torch.Tensor], group, what: str, kind: str = "TP"
                      ) -> List[Dict[str, torch.Tensor]]:
    """Every rank's named int64 vectors (the same names and lengths on every rank), one dict per
    rank, on the CPU. Communication: ONE all-gather of their concatenation."""
    names = list(local)
    lengths = [local[name].numel() for name in names]
    flat = torch.cat([local[name].reshape(-1) for name in names])
    world_size = group_size(group)
    gathered = flat.new_empty(world_size * flat.numel())
    with naming_collective_failures(what, group, kind):
        all_gather_single(gathered, flat, group=group)
    rows = gathered.view(world_size, flat.numel()).cpu()
    return [dict(zip(names, row.split(lengths))) for row in rows]


def _bit_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Two int64 sums of the tensor's bit patterns (plain and position-weighted): exact and
    independent of summation order, so equal tensors give equal checksums on any device, and a
    changed or moved element changes them. A DTensor's local tensor: what this rank holds."""
    flat = local_tensor(tensor.detach()).contiguous().reshape(-1)
    bits = flat.view(_INT_VIEW[flat.element_size()]).to(torch.int64)
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 8191 + 1
    return torch.stack([bits.sum(), (bits * weights).sum(), torch.tensor(flat.numel(), device=flat.device)])


def check_replicated(tensors: Dict[str, torch.Tensor], group, what: str = "check_replicated", *,
                     local_tokens: Optional[int] = None, tokens_per_rank: Optional[Sequence[int]] = None,
                     kind: str = "TP") -> None:
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
    rows = _all_gather_named(local, group, what, kind)
    world_size = len(rows)
    seen_from = f"seen from rank {group_rank(group)}"
    if local_tokens is not None:
        counts = [int(row["local_tokens"]) for row in rows]
        expected = list(tokens_per_rank) if tokens_per_rank is not None else [counts[0]] * world_size
        for rank, (count, wanted) in enumerate(zip(counts, expected)):
            if count != wanted:
                hint = (f"tokens_per_rank says {wanted}" if tokens_per_rank is not None else
                        f"rank 0 holds {counts[0]}; uneven counts need tokens_per_rank={counts}")
                raise ValueError(f"{what}: rank {rank} of the {kind} group holds {count} tokens but {hint} "
                                 f"({seen_from})")
    for rank in range(1, world_size):
        for index, name in enumerate(names):
            if not torch.equal(rows[rank][index], rows[0][index]):
                raise ValueError(
                    f"{what}: {name} on rank {rank} of the {kind} group differs from rank 0 ({seen_from}); the "
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


def _agreement_fields(config: MoEConfig, shapes: Dict[str, tuple], dtype, local_ok: bool,
                      device: torch.device) -> Dict[str, torch.Tensor]:
    # No shard_unit field: a parallel block takes only 1 (MoEBlock._place refuses others locally).
    fields = {"local_ok": [int(local_ok)],
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
    same config (full sizes, layout, scoring, activation, biases) and dtype, and each rank
    the shard shapes that config gives its rank. `local_ok=False` says this rank already rejected
    its own shards (it then raises its own error): the others learn it here and raise too, instead
    of waiting in the block's first collective until the process group's timeout.

    Shards that each pass check_shards can still disagree across ranks (a rank built with another
    intermediate_size or dtype): the block would then run, and its all-reduce would sum
    garbage, fail on mismatched sizes, or hang. Communication: ONE all-gather of ~45 int64.
    """
    world_size, rank = group_size(group), group_rank(group)
    if world_size < 2:
        return
    local = _agreement_fields(config, shapes, dtype, local_ok, collective_device(group))
    rows = [{key: value.tolist() for key, value in row.items()} for row in _all_gather_named(
        local, group, f"{what}: the construction-time check that the ranks' shards agree")]
    if not local_ok:
        return  # the caller raises this rank's own error
    verdict = _agreement_verdict(config, rows, lambda p: shard_shapes(config, p, world_size, shard_unit), "TP",
                                 what, f"seen from rank {rank}")
    if verdict is not None:
        raise ValueError(verdict)


def _agreement_verdict(config: MoEConfig, rows, shapes_of, kind: str, what: str, seen_from: str,
                       same=()) -> Optional[str]:
    """The first disagreement among the gathered agreement rows of a group (a message), or None.
    shapes_of(p): the shard shapes member p must hold. `same`: extra fields every member must share."""
    failed = [p for p, row in enumerate(rows) if not row["local_ok"][0]]
    if failed:
        return (f"{what}: rank {failed[0]} of the {kind} group rejected its shards (its own error says why); "
                f"every rank stops here so that none waits in a later collective ({seen_from})")
    first = rows[0]
    for p, row in enumerate(rows[1:], start=1):
        for name in same:
            if row[name] != first[name]:
                return (f"{what}: rank {p} of the {kind} group has {name}={row[name][0]} but rank 0 of it "
                        f"{name}={first[name][0]}: inconsistent groups (the EP group must hold one rank of each EP "
                        f"rank's TP group, the same TP rank, and every TP group the same size; a DeviceMesh of "
                        f"dimensions ('ep', 'tp') builds them) ({seen_from})")
        for name in _AGREED_FIELDS:
            if row[name] != first[name]:
                decode = (lambda v, n=name: _CODED_FIELDS[n][v]) if name in _CODED_FIELDS else (lambda v: v)
                return (f"{what}: rank {p} of the {kind} group was built with config.{name}={decode(row[name][0])!r} "
                        f"but rank 0 with {decode(first[name][0])!r}; every rank needs the same MoEConfig (full "
                        f"sizes) ({seen_from})")
        if row["dtype"] != first["dtype"]:
            names = {code: dtype_name(d) for code, d in enumerate(FLOAT_DTYPES)}
            return (f"{what}: rank {p} of the {kind} group holds {names.get(row['dtype'][0], 'other')} weights "
                    f"but rank 0 {names.get(first['dtype'][0], 'other')}; the ranks' partial outputs "
                    f"must share one dtype ({seen_from})")
    for p, row in enumerate(rows):
        for name, shape in shapes_of(p).items():
            got = tuple(d for d in row[name] if d >= 0) or None
            if got != shape:
                return (f"{what}: the shards of rank {p} of the {kind} group do not fit together: {name} has shape "
                        f"{got} there, expected {shape} for rank {p} of that group of size {len(rows)} "
                        f"(num_experts {config.num_experts}, intermediate_size {config.intermediate_size}, "
                        f"shard_unit {first['shard_unit'][0]}) ({seen_from})")
    return None


def check_expert_parallel_agree(config: MoEConfig, shapes: Dict[str, tuple], dtype, tp_group, ep_group,
                                shard_unit: int = 1, *, local_ok: bool = True, what: str = "MoEBlock") -> None:
    """check_shards_agree for an expert-parallel block (EP group x TP group): raises ValueError on
    EVERY rank of the mesh the two groups span unless every rank holds its shard of one block,
    the TP ranks of a group share their EP rank and the EP ranks of a group their TP rank.

    A rank learns a verdict only from groups it is in, so the verdict travels three times: the TP
    group's (round 1) goes to every EP group with round 2, which judges the EP group, and that
    verdict goes back to every TP group with round 3: a failure anywhere reaches every rank, and
    every rank joins all three rounds before raising, so none is left waiting.
    Communication: THREE all-gathers of ~50 int64 (TP, EP, TP; the TP ones only with TP > 1).
    """
    tp_size, tp_rank = group_size(tp_group), group_rank(tp_group)
    ep_size, ep_rank = group_size(ep_group), group_rank(ep_group)
    local = _agreement_fields(config, shapes, dtype, local_ok, collective_device(ep_group))
    for name, value in (("ep_rank", ep_rank), ("ep_size", ep_size), ("tp_rank", tp_rank), ("tp_size", tp_size)):
        local[name] = torch.tensor([value], dtype=torch.int64, device=local["local_ok"].device)
    seen_from = f"seen from EP rank {ep_rank}, TP rank {tp_rank}"
    label = f"{what}: the construction-time check that the ranks' shards agree"

    def gathered(fields, group, kind):
        return [{key: value.tolist() for key, value in row.items()}
                for row in _all_gather_named(fields, group, label, kind)]

    verdict = None if local_ok else "this rank's own error"
    if communicates(tp_group):
        rows = gathered(local, tp_group, "TP")
        if verdict is None:
            verdict = _agreement_verdict(
                config, rows, lambda p: shard_shapes(config, p, tp_size, shard_unit, ep_rank=ep_rank, ep_size=ep_size),
                "TP", what, seen_from, same=("ep_rank", "ep_size"))
    local["tp_group_ok"] = torch.tensor([int(verdict is None)], dtype=torch.int64, device=local["local_ok"].device)
    if communicates(ep_group):
        rows = gathered(local, ep_group, "EP")
        if verdict is None:
            verdict = _agreement_verdict(
                config, rows, lambda p: shard_shapes(config, tp_rank, tp_size, shard_unit, ep_rank=p, ep_size=ep_size),
                "EP", what, seen_from, same=("tp_rank", "tp_size"))
        bad = [p for p, row in enumerate(rows) if not row["tp_group_ok"][0]]
        if verdict is None and bad:
            verdict = (f"{what}: the TP group of EP rank {bad[0]} found its shards or groups inconsistent (its ranks' "
                       f"errors say why); every rank stops here ({seen_from})")
    if communicates(tp_group):
        flags = gathered({"ok": torch.tensor([int(verdict is None)], dtype=torch.int64,
                                             device=local["local_ok"].device)}, tp_group, "TP")
        bad = [p for p, row in enumerate(flags) if not row["ok"][0]]
        if verdict is None and bad:
            verdict = (f"{what}: rank {bad[0]} of the TP group found its EP group's shards or groups inconsistent "
                       f"(the errors of that EP group's ranks say why); every rank stops here ({seen_from})")
    if local_ok and verdict is not None:
        raise ValueError(verdict)


def allreduce_gradients(parameters: Sequence[torch.Tensor], group, what: str = "allreduce_router_grads / "
                        "allreduce_gradients: the all-reduce of the replicated parameters' gradients",
                        kind: str = "TP") -> int:
    """Sums the .grad of `parameters` over `group` in ONE all-reduce (flattened; promoted dtype).
    Parameters without a gradient are skipped (the same on every rank, by construction of the
    callers). Returns how many gradients were summed."""
    # A parallel block's gradients are DTensors: their local tensors are summed, in place.
    grads = [local_tensor(p.grad) for p in parameters if p.grad is not None]
    if not grads or not communicates(group):
        return len(grads)
    dtype = grads[0].dtype
    for grad in grads[1:]:
        dtype = torch.promote_types(dtype, grad.dtype)
    buffer = torch.cat([grad.reshape(-1).to(dtype) for grad in grads])
    with naming_collective_failures(what, group, kind):
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for grad in grads:
        grad.copy_(buffer[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    return len(grads)


def allreduce_router_grads(modules_or_model, group=None, *, ep_group=None) -> int:
    """Once per step, after backward: sums the gradients that blocks compute from their own tokens
    only, ONE all-reduce for all blocks together per kind of block present:

    - sequence-parallel blocks, over the TP group: router weight and bias, shared-expert gate,
      routed down bias (the replicated parameters);
    - expert-parallel blocks, over the EP group: the same, and the shared expert's weights
      (replicated over EP; TP-sliced alike on every EP rank of a group).

    modules_or_model: a module (searched recursively) or an iterable of modules. Tensor-parallel
    blocks already hold complete gradients (summing them again would multiply them by the world
    size) and contribute nothing. group / ep_group: the TP / EP group; None takes the blocks' own
    (they must share one). Returns how many gradients were summed.
    """
    modules = [modules_or_model] if isinstance(modules_or_model, torch.nn.Module) else list(modules_or_model)
    kinds = {"sequence_parallel_summed_parameters": ("group", group, "TP"),
             "expert_parallel_summed_parameters": ("ep_group", ep_group, "EP")}
    summed = 0
    for method, (attribute, given, kind) in kinds.items():
        parameters, groups = [], []
        for module in modules:
            for sub in module.modules():
                params = getattr(sub, method, lambda: [])()
                if params:
                    parameters.extend(params)
                    groups.append(getattr(sub, attribute))
        if not parameters:
            continue
        if given is None:
            chosen = groups[0]
            if any(g is not chosen for g in groups):
                raise ValueError(f"{'group' if kind == 'TP' else 'ep_group'}: the blocks summed over the {kind} group "
                                 f"use different process groups; pass the {kind} group")
        elif kind == "TP":
            from .groups import resolve_tp_group
            chosen = resolve_tp_group(given)
        else:
            chosen = given
        summed += allreduce_gradients(
            parameters, chosen, f"allreduce_router_grads: the all-reduce over the {kind} group of the gradients of "
            f"the replicated parameters (router{', shared expert' if kind == 'EP' else ''}, routed down bias)", kind)
    return summed


def all_gather_tensor_lists(local_tensors: List[torch.Tensor], shapes_per_rank: List[List[tuple]],
                            group) -> List[List[torch.Tensor]]:
    """Every rank's list of tensors (same dtypes everywhere; shapes may differ per rank, known to
    all as shapes_per_rank[rank][i]) with ONE all-gather of their bytes, padded to the longest."""
    world_size = group_size(group)
    if not local_tensors:  # nothing to send (every rank alike: the lists agree in length)
        return [[] for _ in range(world_size)]
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
                *, ep_group=None, without: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Full weights on every rank from each rank's shards, with ONE all-gather over `group` (the
    TP group), and with an EP group ONE more over `ep_group` of the routed experts' TP-gathered
    shards (the shared expert is replicated over EP).

    `group` and `ep_group` None means one process: the local shards are the full weights (returned
    as copies). without: names local_shards lacks on purpose (a block's quantized experts, which
    gather on their own), left out of the gather and of the result.
    """
    world_size, rank = group_size(group), group_rank(group)
    ep_size, ep_rank = group_size(ep_group), group_rank(ep_group)

    def with_stand_ins(shards, tp_rank, at_ep_rank):  # shape-only meta tensors for the names left out
        shapes = shard_shapes(config, tp_rank, world_size, shard_unit, ep_rank=at_ep_rank, ep_size=ep_size)
        return {**shards, **{name: torch.empty(shapes[name], device="meta") for name in without}}
    check_shards(config, with_stand_ins(local_shards, rank, ep_rank), rank, world_size, shard_unit,
                 argument="local_shards", ep_rank=ep_rank, ep_size=ep_size)
    names = [name for name in SHARDED_NAMES if name in local_shards and name not in without]
    replicated = {name: local_shards[name].detach() for name in local_shards if name not in names}
    if world_size == 1:
        tp_gathered = [[local_shards[name].detach() for name in names]]
    else:
        shapes_per_rank = [[shard_shapes(config, p, world_size, shard_unit, ep_rank=ep_rank, ep_size=ep_size)[name]
                            for name in names] for p in range(world_size)]
        tp_gathered = all_gather_tensor_lists([local_shards[name].detach() for name in names], shapes_per_rank, group)
    routed = [index for index, name in enumerate(names) if name in EXPERT_SHARDED_NAMES]
    if ep_size == 1 or not routed:  # (none: a block whose routed experts are all `without`)
        ep_gathered = [[tp_gathered[p][i] for p in range(world_size) for i in routed]] * ep_size
    else:
        shapes_per_ep = [[shard_shapes(config, p, world_size, shard_unit, ep_rank=e, ep_size=ep_size)[names[i]]
                          for p in range(world_size) for i in routed] for e in range(ep_size)]
        ep_gathered = all_gather_tensor_lists([tp_gathered[p][i] for p in range(world_size) for i in routed],
                                              shapes_per_ep, ep_group)
    shards_per_rank = []
    for e in range(ep_size):
        for p in range(world_size):
            shards = dict(replicated)
            shards.update((names[i], tp_gathered[p][i]) for i in range(len(names)) if i not in routed)
            shards.update((names[i], ep_gathered[e][p * len(routed) + j]) for j, i in enumerate(routed))
            shards_per_rank.append(with_stand_ins(shards, p, e))
    full = assemble_full(config, shards_per_rank, shard_unit, ep_size=ep_size)
    return {name: tensor for name, tensor in full.items() if name not in without}
