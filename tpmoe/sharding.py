"""How the full weights of one MoE block split into tensor-parallel shards, and back.

Rank p of P holds the intermediate columns [start_p, stop_p) of EVERY routed expert (the
router is replicated: no expert is "owned" by a rank), and the same kind of slice of the
shared expert's intermediate axis. Per weight (names as in tpmoe.weights; R = 2I gated):

  w_gate_up       the rows (columns for gpt_oss) of the gate AND up halves for [start, stop):
                  concatenated: rows [start, stop) ++ [I + start, I + stop)  -> concatenated, I_p
                  interleaved:  rows [2 start, 2 stop)                        -> interleaved, I_p
                  gpt_oss:      last-axis [2 start, 2 stop)                   -> gpt_oss, I_p
                  not gated:    rows (last axis for gpt_oss) [start, stop)
  b_gate_up       the same indices as w_gate_up's R axis
  w_down          [:, :, start:stop] ([:, start:stop, :] for gpt_oss)
  shared_gate_up  as concatenated w_gate_up, on the shared intermediate axis Is
  shared_down     [:, start_s:stop_s]
  router_weight, router_bias, correction_bias, b_down, shared_gate: replicated (whole on every rank)

So each rank's shard is itself a valid block of the same layout with I_p columns, and a
naive split of the 2I axis (which would hand rank 0 only gate columns) never happens.

Shard sizes: the axis is cut into units of `align` columns (1 on CPU; a GPU kernel may want
its block width) and the units dealt out as evenly as possible, lower ranks first; the
columns left over after the last whole unit go to the first rank holding one unit less.
Sizes therefore differ by at most one unit. When the axis has fewer units than ranks, the
last ranks get an EMPTY shard (I_p = 0): they contribute zero to the partial sums and still
join every collective, so nothing hangs (tests/test_tp_block.py runs it).
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from ._checks import FLOAT_DTYPES, dtype_name
from .config import ACTIVATIONS, LAYOUTS, SCORINGS, MoEConfig
from .distributed import all_gather_tensor_lists, group_rank, group_size, naming_collective_failures
from .distributed.groups import all_gather_single
from .weights import check_moe_weights, expected_shapes

# Sliced along the intermediate axis; everything else in the weight dict is replicated.
SHARDED_NAMES = ("w_gate_up", "b_gate_up", "w_down", "shared_gate_up", "shared_down")
REPLICATED_NAMES = ("router_weight", "router_bias", "correction_bias", "b_down", "shared_gate")


def _check_rank(rank, world_size):
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}) (world_size {world_size}), got {rank!r}")


def _check_align(align):
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align: expected a positive int (columns per shard unit), got {align!r}")


def shard_sizes(total: int, world_size: int, align: int = 1) -> List[int]:
    """Columns of an axis of `total` per rank: balanced in units of `align`, summing to total."""
    _check_rank(0, world_size)
    _check_align(align)
    if not isinstance(total, int) or total < 0:
        raise ValueError(f"total: expected a non-negative int, got {total!r}")
    units, leftover = divmod(total, align)
    base, extra = divmod(units, world_size)
    sizes = [(base + (1 if rank < extra else 0)) * align for rank in range(world_size)]
    # Rank `extra` is the first with the smaller unit count (rank 0 when all counts are equal),
    # so adding fewer than `align` columns there keeps every pair within one unit.
    sizes[extra] += leftover
    return sizes


def shard_range(total: int, rank: int, world_size: int, align: int = 1) -> Tuple[int, int]:
    """[start, stop) of rank's columns on an axis of `total`."""
    _check_rank(rank, world_size)
    sizes = shard_sizes(total, world_size, align)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _gate_up_indices(intermediate: int, start: int, stop: int, gated: bool, layout: str) -> torch.Tensor:
    """Indices on the R axis of gate_up (and its bias) that belong to intermediate columns [start, stop)."""
    if not gated:
        return torch.arange(start, stop)
    if layout == "concatenated":
        return torch.cat([torch.arange(start, stop), intermediate + torch.arange(start, stop)])
    return torch.arange(2 * start, 2 * stop)  # interleaved / gpt_oss: (gate_j, up_j) adjacent


def _shard_plan(config: MoEConfig, rank: int, world_size: int, align: int) -> Dict[str, Tuple[int, torch.Tensor]]:
    """For each sharded weight of this config: (axis, indices of rank's slice on that axis)."""
    intermediate = config.intermediate_size
    start, stop = shard_range(intermediate, rank, world_size, align)
    gpt_oss = config.layout == "gpt_oss"
    plan = {
        "w_gate_up": (2 if gpt_oss else 1, _gate_up_indices(intermediate, start, stop, config.gated, config.layout)),
        "w_down": (1 if gpt_oss else 2, torch.arange(start, stop)),
    }
    if config.expert_bias:
        plan["b_gate_up"] = (1, plan["w_gate_up"][1])
    shared = config.shared_intermediate_size
    if shared > 0:
        shared_start, shared_stop = shard_range(shared, rank, world_size, align)
        plan["shared_gate_up"] = (0, _gate_up_indices(shared, shared_start, shared_stop, config.gated,
                                                      "concatenated"))
        plan["shared_down"] = (1, torch.arange(shared_start, shared_stop))
    return plan


def shard_shapes(config: MoEConfig, rank: int, world_size: int, align: int = 1) -> Dict[str, tuple]:
    """Shapes of rank's shard dict (replicated entries keep their full shape)."""
    shapes = dict(expected_shapes(config))
    for name, (axis, indices) in _shard_plan(config, rank, world_size, align).items():
        shape = list(shapes[name])
        shape[axis] = indices.numel()
        shapes[name] = tuple(shape)
    return shapes


def shard_weight(config: MoEConfig, name: str, full: torch.Tensor, rank: int, world_size: int,
                 align: int = 1) -> torch.Tensor:
    """Rank's slice of one full weight (a copy), or the tensor itself for a replicated name."""
    _check_rank(rank, world_size)
    plan = _shard_plan(config, rank, world_size, align)
    if name not in plan:
        return full
    axis, indices = plan[name]
    return full.index_select(axis, indices.to(full.device))


def shard_moe_weights(config: MoEConfig, weights: Dict[str, torch.Tensor], rank: int, world_size: int,
                      align: int = 1) -> Dict[str, torch.Tensor]:
    """Rank's shard dict from the full weights: sharded entries are copies (the full tensors may be
    freed afterwards); replicated entries are the given tensors themselves."""
    check_moe_weights(config, weights, "weights")
    _check_rank(rank, world_size)
    shards = dict(weights)
    for name, (axis, indices) in _shard_plan(config, rank, world_size, align).items():
        full = weights[name]
        shards[name] = full.index_select(axis, indices.to(full.device))
    return shards


def check_shards(config: MoEConfig, shards: Dict[str, torch.Tensor], rank: int, world_size: int,
                 align: int = 1, argument: str = "shards") -> None:
    """Raises ValueError naming the first entry missing, unexpected or sized for another world size."""
    shapes = shard_shapes(config, rank, world_size, align)
    for name, shape in shapes.items():
        if name not in shards:
            raise ValueError(f"{argument}: missing {name!r} (expected shape {shape} on rank {rank} of {world_size})")
        tensor = shards[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{argument}[{name!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            kind = "shard" if name in SHARDED_NAMES else "replicated weight"
            raise ValueError(
                f"{argument}[{name!r}]: expected the {kind} shape {shape} for rank {rank} of a TP group of "
                f"world size {world_size} (intermediate_size {config.intermediate_size}, shared_intermediate_size "
                f"{config.shared_intermediate_size}, align {align}), got {tuple(tensor.shape)}: were these shards "
                f"cut for another world size or config?")
    extra = sorted(set(shards) - set(shapes))
    if extra:
        raise ValueError(f"{argument}: unexpected entries {extra} for this config (expected {sorted(shapes)})")


def assemble_full(config: MoEConfig, shards_per_rank: Sequence[Dict[str, torch.Tensor]],
                  align: int = 1) -> Dict[str, torch.Tensor]:
    """The full weights from every rank's shard dict (rank order): the exact inverse of
    shard_moe_weights, element copies only, so the result is bitwise equal to the original.
    Replicated entries are taken from rank 0."""
    world_size = len(shards_per_rank)
    if world_size < 1:
        raise ValueError("shards_per_rank: expected one shard dict per rank, got none")
    for rank, shards in enumerate(shards_per_rank):
        check_shards(config, shards, rank, world_size, align, argument=f"shards_per_rank[{rank}]")
    full_shapes = expected_shapes(config)
    reference = shards_per_rank[0]
    full = {name: reference[name].detach().clone() for name in full_shapes if name not in SHARDED_NAMES}
    for name in _shard_plan(config, 0, world_size, align):
        full[name] = reference[name].new_empty(full_shapes[name])
    for rank, shards in enumerate(shards_per_rank):
        for name, (axis, indices) in _shard_plan(config, rank, world_size, align).items():
            full[name].index_copy_(axis, indices.to(full[name].device), shards[name].detach().to(full[name].device))
    return full


def gather_full(config: MoEConfig, local_shards: Dict[str, torch.Tensor], group, align: int = 1,
                ) -> Dict[str, torch.Tensor]:
    """Full weights on every rank from each rank's shards, with ONE all-gather over `group`.

    `group` None means one process: the local shards are the full weights (returned as copies).
    """
    world_size, rank = group_size(group), group_rank(group)
    check_shards(config, local_shards, rank, world_size, align, argument="local_shards")
    if world_size == 1:
        return assemble_full(config, [local_shards], align)
    names = list(_shard_plan(config, rank, world_size, align))
    shapes_per_rank = [[shard_shapes(config, p, world_size, align)[name] for name in names]
                       for p in range(world_size)]
    gathered = all_gather_tensor_lists([local_shards[name].detach() for name in names], shapes_per_rank, group)
    shards_per_rank = []
    for p in range(world_size):
        shards = {name: local_shards[name].detach() for name in local_shards if name not in names}
        shards.update(zip(names, gathered[p]))
        shards_per_rank.append(shards)
    return assemble_full(config, shards_per_rank, align)


# What every rank of a TP group must agree on, as ints for one all-gather (check_shards_agree).
_AGREED_FIELDS = ("hidden_size", "intermediate_size", "num_experts", "top_k", "shared_intermediate_size", "gated",
                  "layout", "scoring", "activation", "expert_bias", "router_bias", "correction_bias",
                  "shared_expert_gate", "external_router", "weights_on_input")
_CODED_FIELDS = {"layout": LAYOUTS, "scoring": SCORINGS, "activation": ACTIVATIONS}
_MAX_DIMS = 3


def _agreement_row(config: MoEConfig, shapes, dtype, align: int, local_ok: bool) -> List[int]:
    fields = [_CODED_FIELDS[name].index(getattr(config, name)) if name in _CODED_FIELDS else int(getattr(config, name))
              for name in _AGREED_FIELDS]
    dims = []
    for name in REPLICATED_NAMES + SHARDED_NAMES:  # fixed slots: the row has the same length on every rank
        shape = tuple(shapes.get(name, ())) if shapes else ()
        dims += list(shape) + [-1] * (_MAX_DIMS - len(shape))
    dtype_code = FLOAT_DTYPES.index(dtype) if dtype in FLOAT_DTYPES else -1
    return [int(local_ok)] + fields + [align, dtype_code] + dims


def _describe_shapes(row: List[int]) -> Dict[str, tuple]:
    dims = row[3 + len(_AGREED_FIELDS):]
    shapes = {}
    for slot, name in enumerate(REPLICATED_NAMES + SHARDED_NAMES):
        shape = tuple(d for d in dims[slot * _MAX_DIMS:(slot + 1) * _MAX_DIMS] if d >= 0)
        if shape:
            shapes[name] = shape
    return shapes


def check_shards_agree(config: MoEConfig, shapes: Dict[str, tuple], dtype, group, align: int = 1, *,
                       local_ok: bool = True, what: str = "MoEBlock") -> None:
    """Raises ValueError on EVERY rank of `group` unless all ranks hold shards of one block: the
    same config (full sizes, layout, scoring, activation, biases), align and dtype, and each rank
    the shard shapes that config gives its rank. `local_ok=False` says this rank already rejected
    its own shards (it then raises its own error): the others learn it here and raise too, instead
    of waiting in the block's first collective until the process group's timeout.

    Shards that each pass check_shards can still disagree across ranks (a rank built with another
    intermediate_size, align or dtype): the block would then run, and its all-reduce would sum
    garbage, fail on mismatched sizes, or hang. Communication: ONE all-gather of ~45 int64.
    """
    world_size, rank = group_size(group), group_rank(group)
    if world_size < 2:
        return
    backend = str(dist.get_backend(group))
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    local = torch.tensor(_agreement_row(config, shapes, dtype, align, local_ok), dtype=torch.int64, device=device)
    gathered = local.new_empty(world_size * local.numel())
    with naming_collective_failures(f"{what}: the construction-time check that the ranks' shards agree", group):
        all_gather_single(gathered, local, group=group)
    rows = gathered.view(world_size, local.numel()).cpu().tolist()
    if not local_ok:
        return  # the caller raises this rank's own error
    seen_from = f"seen from rank {rank}"
    failed = [p for p, row in enumerate(rows) if not row[0]]
    if failed:
        raise ValueError(f"{what}: rank {failed[0]} of the TP group rejected its shards (its own error says why); "
                         f"every rank stops here so that none waits in a later collective ({seen_from})")
    for p, row in enumerate(rows[1:], start=1):
        for index, name in enumerate(_AGREED_FIELDS):
            if row[1 + index] != rows[0][1 + index]:
                decode = (lambda v, n=name: _CODED_FIELDS[n][v]) if name in _CODED_FIELDS else (lambda v: v)
                raise ValueError(
                    f"{what}: rank {p} of the TP group was built with config.{name}={decode(row[1 + index])!r} but "
                    f"rank 0 with {decode(rows[0][1 + index])!r}; every rank needs the same MoEConfig (full sizes) "
                    f"({seen_from})")
        offset = 1 + len(_AGREED_FIELDS)
        if row[offset] != rows[0][offset]:
            raise ValueError(f"{what}: rank {p} of the TP group uses align={row[offset]} but rank 0 "
                             f"align={rows[0][offset]}; the shard sizes then differ ({seen_from})")
        if row[offset + 1] != rows[0][offset + 1]:
            names = {code: dtype_name(d) for code, d in enumerate(FLOAT_DTYPES)}
            raise ValueError(f"{what}: rank {p} of the TP group holds {names.get(row[offset + 1], 'other')} weights "
                             f"but rank 0 {names.get(rows[0][offset + 1], 'other')}; the ranks' partial outputs "
                             f"must share one dtype ({seen_from})")
    for p, row in enumerate(rows):
        got, expected = _describe_shapes(row), shard_shapes(config, p, world_size, align)
        for name, shape in expected.items():
            if got.get(name) != shape:
                raise ValueError(
                    f"{what}: the shards of rank {p} of the TP group do not fit together: {name} has shape "
                    f"{got.get(name)} there, expected {shape} for rank {p} of world size {world_size} "
                    f"(intermediate_size {config.intermediate_size}, align {align}) ({seen_from})")
