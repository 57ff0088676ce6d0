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

Shard sizes follow torch.chunk's rule, DTensor's for an uneven Shard (so a block's DTensor
parameters, FSDP2 and distributed checkpoints agree with these functions): every rank holds
ceil(I / P) columns in rank order and the last ranks what is left, possibly nothing (I = 77 over
2: 39 + 38; I = 10 over 4: 3, 3, 3, 1; I = 5 over 4: 2, 2, 1, 0). Until 2026-12-07 the sizes
were balanced (differing by at most one: 3, 3, 2, 2): per-rank state dicts saved before then
hold those sizes and load only through the full weights (gather_full, from_full). A rank with an EMPTY shard (I_p = 0)
contributes zero to the partial sums and still joins every collective, so nothing hangs
(tests/distributed/test_tp_block.py runs it). `shard_unit` (columns per unit, 1 by default) applies the same
rule to units: index maths for kernels that want whole tiles; a MoEBlock takes only 1, the unit
DTensor's rule knows.

Storage: on CUDA a block keeps its expert weights with every row of the innermost
(contiguous) axis starting on a 16-byte boundary, its stride a multiple of 16 elements
(`aligned_storage`, `align_sharded_storage`):
an uneven shard, I_p = 154 of I = 768 over 5 ranks, makes a row of w_down 308 bytes and costs
the GPU kernels their 16-byte async copies. The padding columns are zeros outside the tensor's
logical shape: no math, state dict, gather or optimizer sees them (the Triton kernels may load
them, to keep a mask 16-element uniform, but only ever multiply them by the zeros the kernels
store into the padding of h / d_preact, or compute output columns they never store:
tpmoe.triton.layouts.readable_width). (state_dict() holds the
padded views, of the logical shape and values; torch.save writes their storage, zeros and all,
at most 15 elements a row, and loads them back so; load_state_dict copies into the padded
parameters; gather_full and the transformers adapter's gather_state_dict are compact;
load_state_dict(assign=True) installs the given, compact tensors until the next .to().)

Expert parallelism (EP, optionally combined with TP: rank (e, p) of an EP group of size
P_ep and a TP group of size P): EP rank e owns the contiguous experts [first_e, first_e + n_e)
of the routed per-expert weights (w_gate_up, b_gate_up, w_down; axis 0), and within them the
TP column slice above. The ranges come from the same rule as the columns (shard_sizes with a
unit of one expert): ceil(E / P_ep) experts each, the last ranks fewer and possibly none
(E = 6 over 4: 2, 2, 2, 0; such a rank receives no rows and still joins every exchange). The shared expert is replicated over EP (TP-sliced
only); b_down, the router and the shared gate stay replicated. The default ep_rank=0,
ep_size=1 is plain TP: every function below then slices exactly as without EP.

Index maths only: the collectives over shards (gather_full, and check_shards_agree at a
block's construction) are in tpmoe.distributed.replicated.
"""
from typing import Dict, List, Sequence, Tuple

import torch

from .config import MoEConfig
from .weights import check_moe_weights, expected_shapes

# Sliced along the intermediate axis; everything else in the weight dict is replicated.
SHARDED_NAMES = ("w_gate_up", "b_gate_up", "w_down", "shared_gate_up", "shared_down")
REPLICATED_NAMES = ("router_weight", "router_bias", "correction_bias", "b_down", "shared_gate")
# Routed per-expert weights: under expert parallelism each EP rank keeps its experts' rows of axis 0.
# b_down is per-expert too but stays replicated: it is added on the token's own rank after the
# combine, so no rank needs to own it.
EXPERT_SHARDED_NAMES = ("w_gate_up", "b_gate_up", "w_down")


def _check_rank(rank, world_size):
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}) (world_size {world_size}), got {rank!r}")


def _check_shard_unit(shard_unit):
    if not isinstance(shard_unit, int) or shard_unit < 1:
        raise ValueError(f"shard_unit: expected a positive int (columns per shard unit), got {shard_unit!r}")


def shard_sizes(total: int, world_size: int, shard_unit: int = 1) -> List[int]:
    """Columns of an axis of `total` per rank, summing to total: torch.chunk's rule (DTensor's for
    an uneven Shard, hence FSDP2's and distributed checkpoints') over units of `shard_unit`
    columns: every rank ceil(units / P) units in rank order, the last ranks what is left, possibly
    nothing; a last partial unit (total not a multiple of shard_unit) stays with its unit."""
    _check_rank(0, world_size)
    _check_shard_unit(shard_unit)
    if not isinstance(total, int) or total < 0:
        raise ValueError(f"total: expected a non-negative int, got {total!r}")
    units = -(-total // shard_unit)
    per_rank = -(-units // world_size) * shard_unit
    return [min((rank + 1) * per_rank, total) - min(rank * per_rank, total) for rank in range(world_size)]


def shard_range(total: int, rank: int, world_size: int, shard_unit: int = 1) -> Tuple[int, int]:
    """[start, stop) of rank's columns on an axis of `total`."""
    _check_rank(rank, world_size)
    sizes = shard_sizes(total, world_size, shard_unit)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _check_ep(num_experts: int, ep_rank, ep_size):
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size: expected a positive int (ranks of the EP group), got {ep_size!r}")
    if ep_size > num_experts:
        raise ValueError(f"ep_size: expected at most num_experts = {num_experts} EP ranks (an expert is never "
                         f"split over EP ranks), got an EP group of {ep_size}")
    if not isinstance(ep_rank, int) or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank: expected an int in [0, {ep_size}) (EP size {ep_size}), got {ep_rank!r}")


def expert_ranges(num_experts: int, ep_size: int) -> List[Tuple[int, int]]:
    """(first expert, count) of every EP rank: contiguous ranges covering [0, E) in rank order,
    torch.chunk's counts (shard_sizes): ceil(E / ep_size) each, the last ranks fewer or none."""
    _check_ep(num_experts, 0, ep_size)
    counts = shard_sizes(num_experts, ep_size)
    return [(sum(counts[:rank]), counts[rank]) for rank in range(ep_size)]


def expert_range(num_experts: int, ep_rank: int, ep_size: int) -> Tuple[int, int]:
    """(first expert, count) of EP rank `ep_rank`: see expert_ranges."""
    _check_ep(num_experts, ep_rank, ep_size)
    return expert_ranges(num_experts, ep_size)[ep_rank]


def _expert_slice(config: MoEConfig, name: str, ep_rank: int, ep_size: int):
    """(first, count) of the experts axis (0) of `name` kept by EP rank `ep_rank`; None when the
    whole axis is kept (a name that is not a routed per-expert weight, or no EP)."""
    if ep_size == 1 or name not in EXPERT_SHARDED_NAMES:
        return None
    return expert_range(config.num_experts, ep_rank, ep_size)


def _gate_up_indices(intermediate: int, start: int, stop: int, gated: bool, layout: str) -> torch.Tensor:
    """Indices on the R axis of gate_up (and its bias) that belong to intermediate columns [start, stop)."""
    if not gated:
        return torch.arange(start, stop)
    if layout == "concatenated":
        return torch.cat([torch.arange(start, stop), intermediate + torch.arange(start, stop)])
    return torch.arange(2 * start, 2 * stop)  # interleaved / gpt_oss: (gate_j, up_j) adjacent


def _shard_plan(config: MoEConfig, rank: int, world_size: int,
                shard_unit: int) -> Dict[str, Tuple[int, torch.Tensor]]:
    """For each sharded weight of this config: (axis, indices of rank's slice on that axis)."""
    intermediate = config.intermediate_size
    start, stop = shard_range(intermediate, rank, world_size, shard_unit)
    gpt_oss = config.layout == "gpt_oss"
    plan = {
        "w_gate_up": (2 if gpt_oss else 1, _gate_up_indices(intermediate, start, stop, config.gated, config.layout)),
        "w_down": (1 if gpt_oss else 2, torch.arange(start, stop)),
    }
    if config.expert_bias:
        plan["b_gate_up"] = (1, plan["w_gate_up"][1])
    shared = config.shared_intermediate_size
    if shared > 0:
        shared_start, shared_stop = shard_range(shared, rank, world_size, shard_unit)
        plan["shared_gate_up"] = (0, _gate_up_indices(shared, shared_start, shared_stop, config.gated,
                                                      "concatenated"))
        plan["shared_down"] = (1, torch.arange(shared_start, shared_stop))
    return plan


def shard_shapes(config: MoEConfig, rank: int, world_size: int, shard_unit: int = 1, *, ep_rank: int = 0,
                 ep_size: int = 1) -> Dict[str, tuple]:
    """Shapes of the shard dict of TP rank `rank` (of `world_size`) on EP rank `ep_rank` (of
    `ep_size`); replicated entries keep their full shape."""
    _check_ep(config.num_experts, ep_rank, ep_size)
    shapes = dict(expected_shapes(config))
    for name, (axis, indices) in _shard_plan(config, rank, world_size, shard_unit).items():
        shape = list(shapes[name])
        shape[axis] = indices.numel()
        experts = _expert_slice(config, name, ep_rank, ep_size)
        if experts is not None:
            shape[0] = experts[1]
        shapes[name] = tuple(shape)
    return shapes


def _take(config: MoEConfig, name: str, full: torch.Tensor, axis: int, indices: torch.Tensor, ep_rank: int,
          ep_size: int) -> torch.Tensor:
    """The slice of one full sharded weight (a copy): the EP rank's experts, then the TP columns."""
    experts = _expert_slice(config, name, ep_rank, ep_size)
    if experts is not None:
        full = full.narrow(0, *experts)
    if full.stride(axis) == 0:
        # One value along the axis (a stand-in, tpmoe.quantized_experts.dense_expert_placeholders):
        # every slice of it is its first n, and no copy of the whole is made.
        return full.narrow(axis, 0, indices.numel())
    return full.index_select(axis, indices.to(full.device))


def shard_weight(config: MoEConfig, name: str, full: torch.Tensor, rank: int, world_size: int,
                 shard_unit: int = 1, *, ep_rank: int = 0, ep_size: int = 1) -> torch.Tensor:
    """Rank's slice of one full weight (a copy), or the tensor itself for a replicated name."""
    _check_rank(rank, world_size)
    _check_ep(config.num_experts, ep_rank, ep_size)
    plan = _shard_plan(config, rank, world_size, shard_unit)
    if name not in plan:
        return full
    axis, indices = plan[name]
    return _take(config, name, full, axis, indices, ep_rank, ep_size)


def shard_moe_weights(config: MoEConfig, weights: Dict[str, torch.Tensor], rank: int, world_size: int,
                      shard_unit: int = 1, *, ep_rank: int = 0, ep_size: int = 1) -> Dict[str, torch.Tensor]:
    """Rank's shard dict from the full weights: sharded entries are copies (the full tensors may be
    freed afterwards); replicated entries are the given tensors themselves."""
    check_moe_weights(config, weights, "weights")
    _check_rank(rank, world_size)
    _check_ep(config.num_experts, ep_rank, ep_size)
    shards = dict(weights)
    for name, (axis, indices) in _shard_plan(config, rank, world_size, shard_unit).items():
        shards[name] = _take(config, name, weights[name], axis, indices, ep_rank, ep_size)
    return shards


def check_shards(config: MoEConfig, shards: Dict[str, torch.Tensor], rank: int, world_size: int,
                 shard_unit: int = 1, argument: str = "shards", *, ep_rank: int = 0, ep_size: int = 1) -> None:
    """Raises ValueError naming the first entry missing, unexpected or sized for another world size."""
    shapes = shard_shapes(config, rank, world_size, shard_unit, ep_rank=ep_rank, ep_size=ep_size)
    where_ep = ""
    if ep_size > 1:
        first, count = expert_range(config.num_experts, ep_rank, ep_size)
        where_ep = f" and EP rank {ep_rank} of an EP group of size {ep_size} (experts [{first}, {first + count}))"
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
                f"world size {world_size}{where_ep} (num_experts {config.num_experts}, intermediate_size "
                f"{config.intermediate_size}, shared_intermediate_size "
                f"{config.shared_intermediate_size}, shard_unit {shard_unit}), got {tuple(tensor.shape)}: were these "
                f"shards cut for another world size or config?")
    extra = sorted(set(shards) - set(shapes))
    if extra:
        raise ValueError(f"{argument}: unexpected entries {extra} for this config (expected {sorted(shapes)})")


def assemble_full(config: MoEConfig, shards_per_rank: Sequence[Dict[str, torch.Tensor]],
                  shard_unit: int = 1, *, ep_size: int = 1) -> Dict[str, torch.Tensor]:
    """The full weights from every rank's shard dict: the exact inverse of shard_moe_weights,
    element copies only, so the result is bitwise equal to the original. Rank order is EP-major:
    entry ep_rank * P + tp_rank for a TP size P = len(shards_per_rank) / ep_size (plain TP: the TP
    ranks in order). Replicated entries (and the shared expert, replicated over EP) are taken from
    EP rank 0."""
    if len(shards_per_rank) < 1:
        raise ValueError("shards_per_rank: expected one shard dict per rank, got none")
    _check_ep(config.num_experts, 0, ep_size)
    if len(shards_per_rank) % ep_size:
        raise ValueError(f"shards_per_rank: expected ep_size x TP size dicts (ep_size {ep_size}), got "
                         f"{len(shards_per_rank)}")
    world_size = len(shards_per_rank) // ep_size
    for index, shards in enumerate(shards_per_rank):
        ep_rank, rank = divmod(index, world_size)
        check_shards(config, shards, rank, world_size, shard_unit, argument=f"shards_per_rank[{index}]",
                     ep_rank=ep_rank, ep_size=ep_size)
    full_shapes = expected_shapes(config)
    reference = shards_per_rank[0]
    full = {name: reference[name].detach().clone() for name in full_shapes if name not in SHARDED_NAMES}
    for name in _shard_plan(config, 0, world_size, shard_unit):
        full[name] = reference[name].new_empty(full_shapes[name])
    for index, shards in enumerate(shards_per_rank):
        ep_rank, rank = divmod(index, world_size)
        for name, (axis, indices) in _shard_plan(config, rank, world_size, shard_unit).items():
            experts = _expert_slice(config, name, ep_rank, ep_size)
            if experts is None and ep_rank > 0:
                continue  # replicated over EP: EP rank 0's copy is the one
            target = full[name] if experts is None else full[name].narrow(0, *experts)  # a view of full[name]
            target.index_copy_(axis, indices.to(target.device), shards[name].detach().to(target.device))
    return full


# Rows of a tensor the GPU kernels read start on a 16-byte boundary: cp.async / TMA copies and
# vectorised loads need it, and a row of 154 bf16 (I = 768 over 5 ranks) would lose them all.
ROW_ALIGN_BYTES = 16
# The row stride is rounded to a multiple of 16 ELEMENTS, not only of 16 bytes: the Triton JIT marks
# an int argument (a stride) divisible only when its value is a multiple of 16, so a stride of
# 312 bf16 (624 bytes: 2 I_p = 308 rounded to 16 bytes) still loses every 16-byte copy (gpt_oss
# gate_up and dx at I_p = 154 in `python -m tpmoe.triton.aot --intermediate 154`; dx spilled).
# 16 elements are at least 16 bytes for every dtype.
ROW_ALIGN_ELEMENTS = 16


def aligned_row_stride(columns: int, element_size: int) -> int:
    """The row stride (in elements) of a [rows, columns] buffer or weight: columns rounded up to a
    multiple of 16 elements (hence of 16 bytes at any `element_size`)."""
    if element_size < 1:
        raise ValueError(f"element_size: expected a positive byte count, got {element_size}")
    return -(-columns // ROW_ALIGN_ELEMENTS) * ROW_ALIGN_ELEMENTS


# The weights the expert kernels stream in tiles (the shared expert runs through the same ones),
# and the devices whose kernels want their rows 16-byte aligned. Not the CPU: its C++ path takes
# a contiguous copy of a strided weight on every call, which would cost more than it gains.
ALIGNED_NAMES = ("w_gate_up", "w_down", "shared_gate_up", "shared_down")
ALIGNED_DEVICE_TYPES = ("cuda",)


def aligned_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s values as a view whose innermost rows start on 16-byte boundaries, with strides
    the Triton JIT sees as such: the tensor itself where they already are, else a copy into
    zero-padded storage.

    "Innermost rows": the stride of the dimension next to the contiguous one (in memory order)
    is rounded up to a multiple of 16 elements (`aligned_row_stride`: the
    JIT specialises a stride as divisible only when its value is a multiple of 16), so every
    outer stride is one too; the view keeps the tensor's shape, dtype, device and memory order.
    Tensors of fewer than two dimensions, empty ones, and ones without a unit-stride dimension
    are returned as they are.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < 2 or tensor.numel() == 0:
        return tensor
    # Memory order, outermost first (ties, from size-1 dims, keep the logical order).
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))
    inner = order[-1]
    if tensor.stride(inner) != 1:
        return tensor
    columns = tensor.shape[inner]
    row_stride = aligned_row_stride(columns, tensor.element_size())
    # Aligned already: every outer stride and the start (also what makes this idempotent).
    if (tensor.data_ptr() % ROW_ALIGN_BYTES == 0
            and all(tensor.stride(d) % ROW_ALIGN_ELEMENTS == 0 for d in order[:-1])):
        return tensor
    storage_shape = [tensor.shape[d] for d in order[:-1]] + [row_stride]
    storage = torch.zeros(storage_shape, dtype=tensor.dtype, device=tensor.device)
    view = storage[..., :columns].permute(*[order.index(d) for d in range(tensor.dim())])
    view.copy_(tensor)
    return view


def align_sharded_storage(module: torch.nn.Module) -> None:
    """Re-stores the ALIGNED_NAMES parameters of a block (stacked, tpmoe.stacked; DTensors in a
    parallel block) that sit on an ALIGNED_DEVICE_TYPES device with `aligned_storage` applied to
    their format view, whose innermost rows the kernels read (in place: the Parameter objects
    stay, optimizers keep them)."""
    from torch.distributed.tensor import DTensor

    from .stacked import to_format, to_stacked

    with torch.no_grad():
        for name in ALIGNED_NAMES:
            parameter = getattr(module, name, None)
            if not isinstance(parameter, torch.Tensor) or parameter.device.type not in ALIGNED_DEVICE_TYPES:
                continue
            # A DTensor parameter's own local tensor (to_local() returns an alias, and assigning
            # .data to a DTensor leaves its local tensor as it was): re-stored in place with set_.
            stacked = parameter._local_tensor if isinstance(parameter, DTensor) else parameter.data
            compact = to_format(module.config, name, stacked)
            aligned = aligned_storage(compact)
            if aligned is compact:
                continue
            aligned = to_stacked(module.config, name, aligned)
            if isinstance(parameter, DTensor):
                stacked.set_(aligned.untyped_storage(), aligned.storage_offset(), aligned.shape, aligned.stride())
            else:
                parameter.data = aligned
