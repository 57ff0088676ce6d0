"""`tpmoe.MoEBlock`: router + routed experts + optional shared expert, in one process or
sharded over a tensor-parallel (TP) group with one collective forward and one backward, or with
its experts split over an expert-parallel (EP) group (optionally each expert's columns over a TP
group too: EP x TP).

Parameters and where they live (names as in tpmoe.weights; tpmoe.sharding says how they slice;
stored in tpmoe.stacked's layout, gate and up halves on an axis of their own, and, in a parallel
block, as DTensors of the full weights' shapes on its mesh: tpmoe.distributed.dtensor_parameters):
  router_weight, router_bias, shared_gate, b_down    replicated: whole and identical on every rank
  correction_bias                                     replicated buffer (DeepSeek-V3; not trained)
  w_gate_up, b_gate_up, w_down                        this rank's I_local columns of every expert
                                                      (EP: of its own experts [expert_first, + num_local_experts))
  shared_gate_up, shared_down                         this rank's Is_local columns of the shared expert

TP mode (input replicated on every rank):
  route(x) -> topk_weights, topk_ids; s = sigmoid(x W_sg^T)          replicated, outside f/g
  f(x, topk_weights, s) -> experts on I_local + s * shared on Is_local -> g (all-reduce) -> y
  y += sum_k topk_weights * b_down[topk_ids]                         replicated, after g
The routed down bias is a replicated term: added after the reduction it is counted once, and
its gradient (and that of the routing weights through it) is the same on every rank with no
communication. Sequence-parallel mode replaces f/g by an all-gather of the routed local
tokens and a reduce-scatter of the output (tpmoe.distributed.sequence_parallel). Expert-parallel
mode (inputs hold this rank's tokens; each EP rank routes its own) sends the tokens' rows to the
ranks owning their experts and back (tpmoe.distributed.expert_parallel); the shared expert and
the routed down bias run on the token's own rank.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from . import distributed as tp
from .distributed import expert_parallel as ep
from .config import MoEConfig
from ._checks import FLOAT_DTYPES, check_choice, check_ids_in_range, dtype_name
from .fused import BACKENDS, routed_experts
from .quantized import check_whole_quantized_experts, shard_quantized_experts
from .quantized_experts import QuantizedExperts, dense_expert_placeholders, gather_whole_quantized_experts
from .routing import route
from .distributed.dtensor_parameters import as_dtensor, block_local, block_submesh, local_tensor, mesh_of_groups
from .distributed.groups import mesh_dims_by_name
from .distributed.replicated import check_expert_parallel_agree, check_shards_agree, gather_full
from .sharding import (REPLICATED_NAMES, SHARDED_NAMES, align_sharded_storage, check_shards, expert_range,
                       expert_ranges, shard_moe_weights, shard_sizes)
from .stacked import to_format, to_stacked
from .weights import ExpertWeights, check_moe_weights, expected_shapes, random_moe_weights

# Trained replicated parameters: their gradients are complete on every rank in TP mode and
# per-rank partial sums (over the local tokens) in sequence-parallel and expert-parallel mode.
_TRAINED_REPLICATED = ("router_weight", "router_bias", "shared_gate", "b_down")
# The dense routed experts, which a block's quantized experts replace.
_DENSE_EXPERTS = ("w_gate_up", "w_down")
# Replicated over the EP group (TP-sliced alike on its ranks), so also summed over it per step.
_EP_REPLICATED_SHARDS = ("shared_gate_up", "shared_down")


class _ZeroPartialOutput(torch.autograd.Function):
    """The partial output of a rank whose routed shard is empty (I_local = 0): zeros, with zero
    gradients for x and the routing weights, so that the rank's autograd graph still reaches the
    backward collective of f and the other ranks do not wait for it forever."""

    @staticmethod
    def forward(ctx, hidden_states, topk_weights):
        # Shapes only: keeping the tensors on ctx would hold them (and their graph) alive.
        ctx.hidden_like = (hidden_states.shape, hidden_states.dtype, hidden_states.device)
        ctx.weights_like = (topk_weights.shape, topk_weights.dtype, topk_weights.device)
        return torch.zeros_like(hidden_states)

    @staticmethod
    def backward(ctx, grad_output):
        (hidden_shape, hidden_dtype, device), (weights_shape, weights_dtype, _) = ctx.hidden_like, ctx.weights_like
        return (torch.zeros(hidden_shape, dtype=hidden_dtype, device=device),
                torch.zeros(weights_shape, dtype=weights_dtype, device=device))


def _block_mesh(mesh: DeviceMesh, tp_mesh_dim, ep_mesh_dim):
    """(the dimensions of a user's mesh that a block runs on, their roles), read by the rule
    resolve_groups reads it by (mesh_dims_by_name)."""
    return block_submesh(mesh, *mesh_dims_by_name(mesh, tp_mesh_dim, ep_mesh_dim))


def _check_shard_dtypes(shards: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype the block's weights will have; raises TypeError naming a weight that is not
    floating point, or an expert weight whose dtype differs from w_gate_up's (they meet in one GEMM
    chain; the router and correction bias may keep their own dtype, as DeepSeek-V3's float32 bias)."""
    for name, tensor in shards.items():
        if not tensor.is_floating_point():
            raise TypeError(f"shards[{name!r}]: expected a floating-point tensor, got dtype "
                            f"{dtype_name(tensor.dtype)}")
    if dtype is not None:
        return dtype
    expected = shards["w_gate_up"].dtype
    for name in SHARDED_NAMES + ("b_down", "shared_gate"):
        if name in shards and shards[name].dtype != expected:
            raise TypeError(f"shards[{name!r}]: expected dtype {dtype_name(expected)} (that of "
                            f"w_gate_up), got {dtype_name(shards[name].dtype)}")
    return expected


def _check_routing(routing, num_tokens: int, num_experts: int, device):
    """(router_logits, topk_weights, topk_ids) given to forward, checked against the tokens and,
    before any collective of any mode, the ids against the experts (check_ids_in_range: an id out
    of range would otherwise fail where it lands, in EP mode inside the exchange on every rank)."""
    if not isinstance(routing, (tuple, list)) or len(routing) != 3:
        raise TypeError(f"routing: expected (router_logits or None, topk_weights, topk_ids), got "
                        f"{type(routing).__name__}{'' if not isinstance(routing, (tuple, list)) else f' of {len(routing)}'}")
    logits, weights, ids = routing
    for name, tensor in (("topk_weights", weights), ("topk_ids", ids)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"routing: expected {name} to be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2 or tensor.shape[0] != num_tokens:
            raise ValueError(f"routing: expected {name} of shape [{num_tokens}, K] (one row per token of "
                             f"hidden_states), got {tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"routing: expected {name} on {device} (that of hidden_states), got {tensor.device}")
    if ids.shape != weights.shape:
        raise ValueError(f"routing: expected topk_ids of the shape of topk_weights {tuple(weights.shape)}, got "
                         f"{tuple(ids.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"routing: expected floating-point topk_weights, got {dtype_name(weights.dtype)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"routing: expected int32 or int64 topk_ids, got {dtype_name(ids.dtype)}")
    check_ids_in_range(ids, num_experts)
    return logits, weights, ids.long()


class MoEBlock(nn.Module):
    """An MoE expert block, optionally tensor-parallel over `group`.

    config: full (unsharded) sizes. group: None (one process), a ProcessGroup or a DeviceMesh.
    A DeviceMesh is read by one rule (tpmoe.distributed.groups.mesh_dims_by_name, as
    tpmoe.hf.apply reads it): a dimension named "ep" is the EP group, one named "tp" the TP group,
    any other is left alone (data parallel: each of its ranks runs its own tokens, and summing the
    gradients over it is the caller's job, docs/design.md); `tp_mesh_dim` / `ep_mesh_dim` (a name
    or an index) give those roles to other dimensions, and a 1-D mesh named neither is the TP
    group. sequence_parallel: inputs and outputs hold this rank's tokens only (see forward).
    Expert parallelism: an EP dimension of a DeviceMesh `group` (then its TP dimension, if any, the
    TP group; none: the experts whole on each EP rank), or `ep_group` the EP ProcessGroup (then
    `group`, if given, the TP group). Inputs and outputs hold this rank's tokens (any count
    per rank); EP rank e keeps the experts of tpmoe.sharding.expert_range(E, e, P_ep), each one's
    columns split over the TP group as in TP mode. Once per step call
    tpmoe.distributed.allreduce_router_grads(model) (the replicated parameters' EP sum).
    check_replicated (off by default; for debugging):
    one extra small all-gather per forward verifying that what must agree does, raising on every
    rank and naming the first rank that differs: in TP mode the input and the routing (ids and
    weights); in sequence-parallel mode the token counts (equal, or as tokens_per_rank says) and
    the replicated parameters.
    shard_unit: columns per shard unit of the intermediate axes (tpmoe.sharding). backend: tpmoe.fused_experts'.
    seed: the constructor's random init draws the FULL weights from this seed and keeps this
    rank's slice, so the model is the same at every world size and replicas agree.
    """

    def __init__(self, config: MoEConfig, group=None, *, sequence_parallel: bool = False,
                 check_replicated: bool = False, shard_unit: int = 1, backend: str = "auto", tp_mesh_dim=None,
                 ep_mesh_dim=None, ep_group=None, seed: int = 0, dtype: Optional[torch.dtype] = None, device=None,
                 _shards=None, _uncopied=frozenset(), _quantized=None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a tpmoe.MoEConfig, got {type(config).__name__}")
        for name, flag in (("sequence_parallel", sequence_parallel), ("check_replicated", check_replicated)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__} {flag!r}")
        check_choice(backend, "backend", BACKENDS)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES):
            raise TypeError(f"dtype: expected None or one of {tuple(str(d) for d in FLOAT_DTYPES)}, got {dtype!r}")
        self.config = config
        # What the routed experts compute, and the shared expert (its gate/up always concatenated).
        self._expert_spec = config.expert_spec
        self._shared_spec = self._expert_spec.with_layout("concatenated")
        self.check_replicated = check_replicated
        self.backend = backend
        tp_group, ep_group = tp.resolve_groups(group, tp_mesh_dim, ep_group, ep_mesh_dim)
        mesh = _block_mesh(group, tp_mesh_dim, ep_mesh_dim) if isinstance(group, DeviceMesh) else None
        full = None
        if _shards is None:
            generator = torch.Generator().manual_seed(seed)
            full = random_moe_weights(config, dtype=dtype or torch.get_default_dtype(), device=device or "cpu",
                                      generator=generator)
        self._place(tp_group, ep_group, sequence_parallel=sequence_parallel, shard_unit=shard_unit, shards=_shards,
                    full=full, dtype=dtype, device=device, mesh=mesh, uncopied=_uncopied, quantized=_quantized)

    def _place(self, tp_group, ep_group, *, sequence_parallel: bool, shard_unit: int, shards=None, full=None,
               dtype=None, device=None, requires_grad: Optional[Dict[str, bool]] = None, mesh=None,
               uncopied=frozenset(), quantized: Optional[ExpertWeights] = None) -> None:
        """Sets the block's groups and mode and registers its weights: this rank's `shards`, or its
        slice of the `full` weights (the same on every rank). The one place a block becomes what it
        is, at construction and when a ParallelStyle (tpmoe.parallel_styles) parallelizes it.
        mesh: (the DeviceMesh of the groups, the role "ep" / "tp" of each of its dimensions); the
        parameters become DTensors on it. None builds one from the groups
        (tpmoe.distributed.dtensor_parameters). uncopied: names of `shards` whose tensors become the
        parameters' storage as they are where dtype and device already match (no copy); the caller
        gives them up. quantized: the config's whole routed experts, quantized
        (load_quantized_experts_); then the dense w_gate_up / w_down of `shards` / `full` are
        stand-ins that only meet the shape and agreement checks (dense_expert_placeholders) and
        are never copied: the block keeps this rank's slice of `quantized` in their place."""
        config = self.config
        self.group, self.ep_group = tp_group, ep_group
        self.tp_size, self.tp_rank = tp.group_size(self.group), tp.group_rank(self.group)
        self.expert_parallel = self.ep_group is not None
        self.ep_size, self.ep_rank = tp.group_size(self.ep_group), tp.group_rank(self.ep_group)
        if self.expert_parallel and sequence_parallel:
            raise ValueError("sequence_parallel: expected False with expert parallelism (its inputs already hold "
                             "this rank's tokens), got True")
        self.sequence_parallel = sequence_parallel
        # The forward of this mode, chosen here once (forward does not branch on the mode).
        self.mode = "ep" if self.expert_parallel else "sp" if sequence_parallel else "tp"
        self.shard_unit = shard_unit
        self.I_local = shard_sizes(config.intermediate_size, self.tp_size, shard_unit)[self.tp_rank]
        self.Is_local = shard_sizes(config.shared_intermediate_size, self.tp_size, shard_unit)[self.tp_rank]
        # A rank that rejects its shards (or its groups, or an EP group larger than E) still joins
        # the agreement all-gathers (with a flag saying so) before raising: the other ranks then
        # raise too instead of waiting for it in the first forward's collective until the process
        # group's timeout.
        local_error = None
        try:
            if shard_unit != 1 and (tp_group is not None or ep_group is not None):
                raise ValueError(f"shard_unit: expected 1 for a parallel block (its parameters are DTensors, cut by "
                                 f"torch.chunk's rule over columns), got {shard_unit}")
            self.expert_first, self.num_local_experts = expert_range(config.num_experts, self.ep_rank, self.ep_size)
            tp.check_groups_disjoint(self.group, self.ep_group)
            if shards is None:
                shards = shard_moe_weights(config, full, self.tp_rank, self.tp_size, shard_unit, ep_rank=self.ep_rank,
                                           ep_size=self.ep_size)
            check_shards(config, shards, self.tp_rank, self.tp_size, shard_unit, ep_rank=self.ep_rank,
                         ep_size=self.ep_size)
            weights_dtype = _check_shard_dtypes(shards, dtype)
        except (TypeError, ValueError) as error:
            local_error, weights_dtype = error, None
        agreed_shapes = {name: tuple(t.shape) for name, t in shards.items()} if local_error is None else {}
        if self.expert_parallel:
            check_expert_parallel_agree(config, agreed_shapes, weights_dtype, self.group, self.ep_group, shard_unit,
                                        local_ok=local_error is None)
        elif tp.communicates(self.group):
            check_shards_agree(config, agreed_shapes, weights_dtype, self.group, shard_unit,
                               local_ok=local_error is None)
        if local_error is not None:
            raise local_error
        if mesh is None:
            mesh = mesh_of_groups(self.group, self.ep_group)
        mesh, roles = mesh if mesh is not None else (None, None)
        self.mesh = mesh
        for name, tensor in shards.items():
            if quantized is not None and name in _DENSE_EXPERTS:
                continue
            value = tensor.detach().to(dtype=dtype or tensor.dtype, device=device or tensor.device)
            if value.data_ptr() == tensor.data_ptr() and name not in uncopied:
                value = value.clone()  # still the caller's tensor: the block keeps its own
            if name == "correction_bias":
                self.register_buffer(name, value)  # not trained: a plain tensor, the same on every rank
                continue
            value = to_stacked(config, name, value)
            if mesh is not None:
                value = as_dtensor(config, name, value, mesh, roles)
            trained = True if requires_grad is None else requires_grad.get(name, True)
            setattr(self, name, nn.Parameter(value, requires_grad=trained))
        align_sharded_storage(self)
        if quantized is not None:
            self._set_quantized_experts(quantized, device or shards["w_gate_up"].device, weights_dtype)

    def check_one_process(self, what: str) -> None:
        """Raises ValueError naming `what` unless this block is a one-process block (no groups)."""
        if self.group is not None or self.ep_group is not None:
            raise ValueError(f"{what}: expected a one-process MoEBlock, got one already parallel "
                             f"(tp {self.tp_rank}/{self.tp_size}, ep {self.ep_rank}/{self.ep_size})")

    def parallelize_(self, tp_group=None, *, ep_group=None, sequence_parallel: bool = False,
                     mesh=None) -> "MoEBlock":
        """In place: this one-process block keeps this rank's slice of its weights over `tp_group`
        (and its experts over `ep_group`), as MoEBlock.from_full would have built it; returns self.
        Every rank must hold the same weights (tpmoe.parallel_styles broadcasts them first). The
        parameters are new tensors, DTensors on `mesh` ((the DeviceMesh of the groups, the role
        "ep" / "tp" of each dimension); None: one built from the groups): build optimizers
        afterwards, as with torch's parallelize_module."""
        self.check_one_process("parallelize_")
        if not isinstance(sequence_parallel, bool):
            raise TypeError(f"sequence_parallel: expected a bool, got {type(sequence_parallel).__name__} "
                            f"{sequence_parallel!r}")
        full = dict(self.local_shards())
        requires_grad = {name: tensor.requires_grad for name, tensor in self._weight_items()}
        quantized = None
        if hasattr(self, "quantized_experts"):
            # One process: its quantized experts are the whole ones, cut again below like the rest.
            quantized = self.quantized_experts.weights()
            _, dtype = self._experts_device_and_dtype()
            full.update(dense_expert_placeholders(expected_shapes(self.config), dtype, quantized.w_gate_up.device))
        self._place(tp_group, ep_group, sequence_parallel=sequence_parallel, shard_unit=1, full=full,
                    requires_grad=requires_grad, mesh=mesh, quantized=quantized)
        return self

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() copy parameters compactly: the expert weights get their
        # 16-byte aligned rows back on the new device (tpmoe.sharding.aligned_storage).
        super()._apply(fn, recurse)
        align_sharded_storage(self)
        return self

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_full(cls, config: MoEConfig, weights: Dict[str, torch.Tensor], group=None, **kwargs) -> "MoEBlock":
        """Every rank passes the same full weights; each keeps its slice (tpmoe.sharding)."""
        check_moe_weights(config, weights, "weights")
        tp_group, ep_group = tp.resolve_groups(group, kwargs.get("tp_mesh_dim"), kwargs.get("ep_group"),
                                               kwargs.get("ep_mesh_dim"))
        shards = shard_moe_weights(config, weights, tp.group_rank(tp_group), tp.group_size(tp_group),
                                   kwargs.get("shard_unit", 1), ep_rank=tp.group_rank(ep_group),
                                   ep_size=tp.group_size(ep_group))
        return cls(config, group, _shards=shards, **kwargs)

    @classmethod
    def from_quantized(cls, config: MoEConfig, experts: ExpertWeights, weights: Dict[str, torch.Tensor], group=None,
                       **kwargs) -> "MoEBlock":
        """A block whose routed experts are quantized from the start (load_quantized_experts_ says
        what that means): `experts` the config's whole quantized experts, `weights` the block's
        other full weights (as from_full takes them, without w_gate_up and w_down; the block
        computes in their dtype), both the same on every rank. No dense expert weight is ever
        made, so a model too large to hold dense builds this way."""
        check_whole_quantized_experts(experts, config, argument="experts")
        if not isinstance(weights, dict):
            raise TypeError(f"weights: expected a dict of the block's full weights, got {type(weights).__name__}")
        dense = [name for name in _DENSE_EXPERTS if name in weights]
        if dense:
            raise ValueError(f"weights: expected no {' or '.join(dense)} (the quantized experts take their place), "
                             f"got {', '.join(dense)}")
        router = weights.get("router_weight")
        if not isinstance(router, torch.Tensor):
            raise ValueError(f"weights: expected the block's full weights, a router_weight tensor among them, got "
                             f"{sorted(weights)}")
        full = {**weights, **dense_expert_placeholders(expected_shapes(config), router.dtype,
                                                       experts.w_gate_up.device)}
        return cls.from_full(config, full, group, _quantized=experts, **kwargs)

    @classmethod
    def from_shards(cls, config: MoEConfig, shards: Dict[str, torch.Tensor], group=None, **kwargs) -> "MoEBlock":
        """Each rank passes its own shard dict (shapes from tpmoe.sharding.shard_shapes for its TP rank,
        and its EP rank with expert parallelism)."""
        return cls(config, group, _shards=shards, **kwargs)

    def local_shards(self) -> Dict[str, torch.Tensor]:
        """This rank's weights (detached views of the parameters; under FSDP2 gathered over its
        dimension), named and shaped as in tpmoe.weights."""
        return {name: to_format(self.config, name, block_local(tensor, self.mesh)) for name, tensor in self._weight_items()}

    def local_grads(self) -> Dict[str, Optional[torch.Tensor]]:
        """The .grad of each trained weight of this rank (None where there is none), as in tpmoe.weights."""
        return {name: None if tensor.grad is None else to_format(self.config, name, block_local(tensor.grad, self.mesh))
                for name, tensor in self._weight_items() if isinstance(tensor, nn.Parameter)}

    def load_quantized_experts_(self, experts: ExpertWeights) -> "MoEBlock":
        """In place: the routed experts become `experts`, quantized (an ExpertWeights of format
        "fp8_block", tpmoe.fp8, or "mxfp4", tpmoe.mxfp4: the config's WHOLE experts, the same on
        every rank; a "gpt_oss" block's packed row-major and interleaved, as GPT-OSS's MXFP4
        checkpoints are), of which this rank keeps its slice (tpmoe.quantized_experts), at any TP
        size and in every mode. The dense w_gate_up and w_down are dropped; the quantized experts
        are frozen: no gradient reaches them, while the router, the biases, the shared expert and
        the rest of a model still train. Returns self. A block built for quantized experts need
        never hold dense ones: MoEBlock.from_quantized."""
        device, dtype = self._experts_device_and_dtype()
        self._set_quantized_experts(experts, device, dtype)
        return self

    def _set_quantized_experts(self, experts: ExpertWeights, device, dtype: torch.dtype) -> None:
        """This rank's slice of the whole quantized `experts` in place of the dense ones, on
        `device`, the block computing in `dtype`."""
        spec = check_whole_quantized_experts(experts, self.config, argument="experts")
        local = QuantizedExperts(shard_quantized_experts(experts, spec, tp_rank=self.tp_rank, tp_size=self.tp_size,
                                                         ep_rank=self.ep_rank, ep_size=self.ep_size))
        for name in _DENSE_EXPERTS:
            if hasattr(self, name):
                delattr(self, name)
        self.quantized_experts = local.to(device)
        self._quantized_spec = spec
        # Follows the block's dtype casts (a dtype to compute in, now that no expert weight shows it).
        self.register_buffer("_compute_dtype", torch.empty(0, dtype=dtype, device=device), persistent=False)

    def _experts_device_and_dtype(self):
        """(where the routed experts live, the dtype the block computes in)."""
        if hasattr(self, "quantized_experts"):
            return self.quantized_experts.w_gate_up.device, self._compute_dtype.dtype
        return self.w_gate_up.device, self.w_gate_up.dtype

    def _weight(self, name: str) -> torch.Tensor:
        """This rank's weight `name` as tpmoe.weights shapes it, a differentiable view of the parameter's
        local tensor (DTensor.to_local: no copy, no collective): what the kernels take."""
        return to_format(self.config, name, local_tensor(getattr(self, name)))

    def gather_full(self) -> Dict[str, torch.Tensor]:
        """The full weights on every rank, bitwise equal to what from_full sliced: ONE all-gather
        (over the TP group; with EP one more, over the EP group). A block with quantized experts
        gives every weight but w_gate_up and w_down; gather_quantized_experts gives those."""
        quantized = hasattr(self, "quantized_experts")
        return gather_full(self.config, self.local_shards(), self.group, self.shard_unit, ep_group=self.ep_group,
                           without=_DENSE_EXPERTS if quantized else ())

    def gather_quantized_experts(self) -> ExpertWeights:
        """The whole quantized experts on every rank, bitwise those load_quantized_experts_ (or
        from_quantized) was given: one all-gather of their slices over the TP group (with EP one
        more over the EP group). ValueError where the experts are dense."""
        if not hasattr(self, "quantized_experts"):
            raise ValueError("gather_quantized_experts: this block's routed experts are dense (w_gate_up, w_down): "
                             "gather_full gathers them")
        return gather_whole_quantized_experts(self.quantized_experts, self._quantized_spec, self.config, self.group,
                                              self.ep_group)

    def sequence_parallel_summed_parameters(self):
        """The parameters whose gradients tpmoe.distributed.allreduce_router_grads sums (SP mode only)."""
        if not self.sequence_parallel or not tp.communicates(self.group):
            return []
        return [getattr(self, name) for name in _TRAINED_REPLICATED if hasattr(self, name)]

    def expert_parallel_summed_parameters(self):
        """The parameters whose gradients tpmoe.distributed.allreduce_router_grads sums over the EP
        group (EP mode only): the replicated ones and the shared expert's TP slices."""
        if not self.expert_parallel or not tp.communicates(self.ep_group):
            return []
        return [getattr(self, name) for name in _TRAINED_REPLICATED + _EP_REPLICATED_SHARDS if hasattr(self, name)]

    def _weight_items(self):
        for name in REPLICATED_NAMES + SHARDED_NAMES:
            if hasattr(self, name):
                yield name, getattr(self, name)

    def extra_repr(self) -> str:
        c = self.config
        return (f"H={c.hidden_size}, I={c.intermediate_size} (I_local={self.I_local}), E={c.num_experts}, "
                f"top_k={c.top_k}, shared={c.shared_intermediate_size} (Is_local={self.Is_local}), "
                f"tp={self.tp_rank}/{self.tp_size}, sequence_parallel={self.sequence_parallel}" + self._ep_repr())

    def _ep_repr(self) -> str:
        if not self.expert_parallel:
            return ""
        counts = sorted({count for _, count in expert_ranges(self.config.num_experts, self.ep_size)})
        spread = (f"uneven ranges of {counts[-1]} or {counts[0]} experts" if len(counts) > 1
                  else f"even ranges of {counts[0]} experts")
        return (f", ep={self.ep_rank}/{self.ep_size}, experts [{self.expert_first}, "
                f"{self.expert_first + self.num_local_experts}) of {self.config.num_experts} ({spread})")

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states: torch.Tensor, tokens_per_rank: Optional[Sequence[int]] = None, *,
                routing=None, return_routing: bool = False):
        """[..., H] -> [..., H]; with return_routing=True, (output, route(x) of this rank's tokens).

        routing: None (the block's own router), or (router_logits or None, topk_weights [T, K],
        topk_ids [T, K]) of this rank's T tokens from a router that runs outside the block, the
        same on every rank of a TP group (required with config.external_router). Gradients flow
        back into topk_weights, complete on every rank, as into the block's own router.

        TP mode: hidden_states is the same on every rank, and so is the output.
        Sequence-parallel mode: hidden_states holds this rank's tokens (the rows of its flattened
        leading dims; rank p's rows follow rank p-1's in the full sequence) and so does the output.
        Uneven counts need `tokens_per_rank` (the count of every rank, the same list on all ranks);
        without it the counts must be equal: unequal counts then fail inside the all-gather or
        hang until the process group's timeout, and check_replicated=True rejects them with a
        clear error (naming the rank and the tokens_per_rank to pass) before any collective.

        Expert-parallel mode: hidden_states holds this rank's tokens, any count per EP rank (the
        counts travel in the block's counts all-to-all; no tokens_per_rank), and so does the
        output. With TP the ranks of a TP group must hold the SAME tokens (as in TP mode): their
        received rows meet in one all-reduce, which differing tokens would mis-size (gloo then
        aborts the process). check_replicated=True checks it within the TP group, raising there;
        the other groups' ranks then fail in their next collective, naming it (CollectiveError).
        """
        config = self.config
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != config.hidden_size:
            raise ValueError(f"hidden_states: expected shape [..., {config.hidden_size}] (config.hidden_size), "
                             f"got {tuple(hidden_states.shape)}")
        weights_device, expert_dtype = self._experts_device_and_dtype()
        if hidden_states.device != weights_device:
            raise ValueError(f"hidden_states: expected a tensor on {weights_device} (where the block's weights are), "
                             f"got one on {hidden_states.device}")
        if hidden_states.dtype != expert_dtype:
            raise TypeError(f"hidden_states: expected dtype {dtype_name(expert_dtype)} (that of the "
                            f"block's weights; convert the input or the block), got {dtype_name(hidden_states.dtype)}")
        if tokens_per_rank is not None and not self.sequence_parallel:
            raise ValueError("tokens_per_rank: only used in sequence-parallel mode, "
                             "got it with sequence_parallel=False")
        leading_shape = hidden_states.shape[:-1]
        x = hidden_states.reshape(-1, config.hidden_size)
        if routing is None:
            router_logits, topk_weights, topk_ids = self.route(x)
        else:
            router_logits, topk_weights, topk_ids = _check_routing(routing, x.shape[0], config.num_experts, x.device)
        shared_gate = torch.sigmoid(F.linear(x, self._weight("shared_gate"))) if hasattr(self, "shared_gate") else None

        y = _MODE_OUTPUTS[self.mode](self, x, topk_weights, topk_ids, shared_gate, tokens_per_rank)

        if hasattr(self, "b_down"):
            y = y + self._routed_down_bias(topk_weights, topk_ids).to(y.dtype)
        if len(leading_shape) != 1:
            # A copy, not a view of the [T, H] result: an in-place op by the caller on a view
            # (x += block(x)) would bypass the hooks FSDP2 puts on the output; [T, H] is small
            # beside the block. (Every mode's [T, H] result is a fresh tensor already.)
            y = y.reshape(*leading_shape, config.hidden_size).clone()
        if return_routing:
            return y, (router_logits, topk_weights, topk_ids)
        return y

    # ------------------------------------------------------------------ the modes (chosen in _place)

    def _tensor_parallel_output(self, x, topk_weights, topk_ids, shared_gate, tokens_per_rank):
        """TP (and one process): f, this rank's columns, g (ONE all-reduce each way)."""
        if self.check_replicated:
            tp.check_replicated({"hidden_states": x, "topk_ids": topk_ids, "topk_weights": topk_weights},
                                self.group, what="MoEBlock(check_replicated=True)")
        x_tp, weights_tp, gate_tp = tp.copy_to_tensor_parallel_region(x, topk_weights, shared_gate, self.group)
        partial = self._partial_output(x_tp, weights_tp, topk_ids, gate_tp)
        return tp.reduce_from_tensor_parallel_region(partial, self.group)

    def _sequence_parallel_output(self, x, topk_weights, topk_ids, shared_gate, tokens_per_rank):
        """SP: all-gather the routed local tokens, this rank's columns, reduce-scatter."""
        if self.check_replicated:
            replicated = {name: local_tensor(getattr(self, name)) for name in REPLICATED_NAMES if hasattr(self, name)}
            tp.check_replicated(replicated, self.group, what="MoEBlock(check_replicated=True)",
                                local_tokens=x.shape[0], tokens_per_rank=tokens_per_rank)
        x_all, weights_all, ids_all, gate_all = tp.gather_from_sequence_parallel_region(
            x, topk_weights, topk_ids, shared_gate, self.group, tokens_per_rank)
        partial = self._partial_output(x_all, weights_all, ids_all, gate_all)
        return tp.reduce_scatter_to_sequence_parallel_region(partial, self.group, tokens_per_rank)

    def _expert_parallel_mode_output(self, x, topk_weights, topk_ids, shared_gate, tokens_per_rank):
        """EP (x TP): the token exchange (tpmoe.distributed.expert_parallel)."""
        if self.check_replicated:
            tp.check_replicated({"hidden_states": x, "topk_ids": topk_ids, "topk_weights": topk_weights},
                                self.group, what="MoEBlock(check_replicated=True)")
            replicated = {name: local_tensor(getattr(self, name)) for name in REPLICATED_NAMES if hasattr(self, name)}
            tp.check_replicated(replicated, self.ep_group, what="MoEBlock(check_replicated=True)", kind="EP")
        return self._expert_parallel_output(x, topk_weights, topk_ids, shared_gate)

    def route(self, x: torch.Tensor):
        """x [T, H] -> (router_logits [T, E], topk_weights [T, K], topk_ids [T, K]).

        The router is replicated: every rank computes the same routing for the same tokens."""
        config = self.config
        if config.external_router:
            raise ValueError("routing: this block has no router of its own (config.external_router); pass "
                             "routing=(router_logits, topk_weights, topk_ids) to forward")
        router_dtype = config.router_dtype or x.dtype
        bias = self._weight("router_bias").to(router_dtype) if hasattr(self, "router_bias") else None
        logits = F.linear(x.to(router_dtype), self._weight("router_weight").to(router_dtype), bias)
        topk_weights, topk_ids = route(logits, config.top_k, scoring=config.scoring, renormalize=config.renormalize,
                                       correction_bias=getattr(self, "correction_bias", None), n_group=config.n_group,
                                       topk_group=config.topk_group, routed_scaling_factor=config.routed_scaling_factor)
        return logits, topk_weights, topk_ids

    def expert_outputs(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, H], [T, K] -> [T, K, H]: each picked expert's output for its token, unweighted and
        complete on every rank, for blocks that transform each expert's output before weighting
        it (a per-expert output norm). TP: ONE all-reduce of the [T*K, H] outputs forward (g) and
        ONE of dx backward (f); the weighting, after g, needs none. EP: the block's own exchange
        (tpmoe.distributed.expert_parallel), which returns exactly these outputs. No shared expert
        here."""
        config = self.config
        if config.shared_intermediate_size or config.weights_on_input:
            raise ValueError("expert_outputs: a block with a shared expert or weights on the input has no per-expert "
                             "outputs of its own")
        num_tokens, top_k = topk_ids.shape
        check_ids_in_range(topk_ids, config.num_experts)  # before any collective, as in forward
        if self.expert_parallel:
            outputs = self._expert_parallel_pairs(hidden_states, None, topk_ids, None)[0]
            if hasattr(self, "b_down"):
                outputs = outputs + self._weight("b_down")[topk_ids].to(outputs.dtype)
            return outputs
        x, _, _ = tp.copy_to_tensor_parallel_region(hidden_states, None, None, self.group)
        x_pairs = x[:, None, :].expand(num_tokens, top_k, x.shape[-1]).reshape(num_tokens * top_k, -1)
        ids_pairs = topk_ids.reshape(-1, 1)
        ones = x_pairs.new_ones(num_tokens * top_k, 1)
        if self.I_local > 0:
            partial = self._routed_experts(x_pairs, ids_pairs, ones)
        else:
            partial = _ZeroPartialOutput.apply(x_pairs, ones)
        outputs = tp.reduce_from_tensor_parallel_region(partial, self.group)
        if hasattr(self, "b_down"):
            outputs = outputs + self._weight("b_down")[ids_pairs[:, 0]].to(outputs.dtype)
        return outputs.view(num_tokens, top_k, -1)

    def _partial_output(self, x, topk_weights, topk_ids, shared_gate):
        """This rank's share of the routed experts + shared expert (sums to the block over ranks)."""
        config = self.config
        if self.I_local > 0 and config.weights_on_input:
            # Each (token, k) pair is its own row, scaled before the experts, summed over k after.
            num_tokens, top_k = topk_ids.shape
            x_pairs = (x[:, None, :] * topk_weights[:, :, None].to(x.dtype)).reshape(num_tokens * top_k, -1)
            ones = x_pairs.new_ones(num_tokens * top_k, 1)
            partial = self._routed_experts(x_pairs, topk_ids.reshape(-1, 1), ones).view(num_tokens, top_k, -1).sum(dim=1)
        elif self.I_local > 0:
            partial = self._routed_experts(x, topk_ids, topk_weights)
        else:
            partial = _ZeroPartialOutput.apply(x, topk_weights)
        if self.Is_local > 0:
            partial = partial + self._shared_expert_rows(x, shared_gate)
        return partial

    def _local_expert_rows(self, rows, local_ids):
        """EP: this rank's partial (its TP columns) of its own experts on the received rows, unweighted."""
        ones = rows.new_ones(rows.shape[0], 1)
        if self.I_local == 0 or self.num_local_experts == 0:  # an empty shard, or an EP rank without experts
            return _ZeroPartialOutput.apply(rows, ones)
        return self._routed_experts(rows, local_ids[:, None], ones)

    def _routed_experts(self, x, topk_ids, topk_weights):
        """tpmoe.routed_experts over this rank's routed experts (its columns of them)."""
        b_gate_up = self._weight("b_gate_up") if hasattr(self, "b_gate_up") else None
        if hasattr(self, "quantized_experts"):
            return routed_experts(x, self.quantized_experts.weights(b_gate_up), topk_ids, topk_weights,
                                  self._quantized_spec, backend=self.backend)
        weights = ExpertWeights(self._weight("w_gate_up"), self._weight("w_down"), b_gate_up)
        return routed_experts(x, weights, topk_ids, topk_weights, self._expert_spec, backend=self.backend)

    def _shared_expert_rows(self, x, shared_gate):
        """This rank's partial (its Is_local columns) of the gated shared expert on tokens x: one more
        expert that every token picks, weighted by its gate."""
        if self.Is_local == 0:
            return x.new_zeros(x.shape)  # EP x TP: joins the TP all-reduce as zeros; f fills the missing grads
        shared_ids = torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device)
        weight = shared_gate if shared_gate is not None else x.new_ones(x.shape[0], 1)
        weights = ExpertWeights(self._weight("shared_gate_up")[None], self._weight("shared_down")[None])
        return routed_experts(x, weights, shared_ids, weight, self._shared_spec,
                              backend=self.backend)

    def _expert_parallel_pairs(self, x, topk_weights, topk_ids, shared_gate):
        """EP: ([T, K, H] per-pair expert outputs, shared expert [T, H] or None), complete.

        dispatch (tpmoe.distributed.expert_parallel) -> [TP > 1: f] this rank's experts on the
        received rows (+ the shared expert on the local tokens) [g: ONE all-reduce] -> combine.
        With TP the shared expert's local tokens ride with the received rows through f and g: one
        all-reduce each way carries both partials."""
        config = self.config
        dispatched = ep.dispatch_rows(x, topk_ids, num_experts=config.num_experts, ep_group=self.ep_group,
                                      input_weights=topk_weights if config.weights_on_input else None)
        num_received = dispatched.rows.shape[0]
        has_shared = bool(config.shared_intermediate_size)
        joined = has_shared and tp.communicates(self.group)
        region_in = torch.cat([dispatched.rows, x]) if joined else dispatched.rows
        region_in, _, gate = tp.copy_to_tensor_parallel_region(region_in, None, shared_gate if joined else None,
                                                               self.group)
        partial = self._local_expert_rows(region_in[:num_received], dispatched.plan.local_ids)
        if joined:
            partial = torch.cat([partial, self._shared_expert_rows(region_in[num_received:], gate)])
        reduced = tp.reduce_from_tensor_parallel_region(partial, self.group)
        shared = None
        if joined:
            shared = reduced[num_received:]
        elif has_shared:
            shared = self._shared_expert_rows(x, shared_gate)
        return ep.combine_rows(reduced[:num_received], dispatched, self.ep_group), shared

    def _expert_parallel_output(self, x, topk_weights, topk_ids, shared_gate):
        """EP: the block's output on this rank's tokens, but for the routed down bias."""
        pair_outputs, shared = self._expert_parallel_pairs(x, topk_weights, topk_ids, shared_gate)
        if self.config.weights_on_input:
            y = pair_outputs.sum(dim=1)
        else:
            # The weighted sum over k on the token's own rank: a dense reduction in a fixed order.
            dtype = torch.promote_types(pair_outputs.dtype, topk_weights.dtype)
            y = (pair_outputs.to(dtype) * topk_weights[:, :, None].to(dtype)).sum(dim=1).to(x.dtype)
        return y if shared is None else y + shared

    def _routed_down_bias(self, topk_weights, topk_ids):
        """sum_k topk_weights[t, k] * b_down[topk_ids[t, k]], as a [T, E] x [E, H] product: its
        gradients are matmuls and gathers, deterministic, so ranks computing it agree bitwise."""
        combine = topk_weights.new_zeros(topk_weights.shape[0], self.config.num_experts)
        combine = combine.scatter_add(1, topk_ids, topk_weights)
        return combine @ self._weight("b_down").to(combine.dtype)


# mode (MoEBlock.mode) -> its forward after routing: [T, H] tokens and routing -> y, but for the
# routed down bias (added after, in every mode).
_MODE_OUTPUTS = {"tp": MoEBlock._tensor_parallel_output, "sp": MoEBlock._sequence_parallel_output,
                 "ep": MoEBlock._expert_parallel_mode_output}
