"""`tpmoe.hf.apply`: find every MoE block of a transformers model and swap it (or its experts) for tpmoe."""
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from torch import nn

from .judge import Plan, is_moe_block, plan_for
from .shards import collect_shards, dtensor_group
from .version import TESTED_SPEC, warn_if_untested


def require_transformers():
    """tpmoe.hf imports without transformers; the calls that need it say so here, and warn once
    for a release outside the tested range (tpmoe/hf/version.py)."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"tpmoe.hf needs Hugging Face transformers: pip install -e .[hf] "
                          f"({TESTED_SPEC}, accelerate)") from error
    warn_if_untested(transformers.__version__)


@dataclass(frozen=True)
class ReplacedBlock:
    """One swapped block. mode: "block" (the whole block is tpmoe's) or "experts" (its experts
    module is; the rest of the block runs as transformers wrote it). pattern: the block structure
    (tpmoe/hf/registry.py BLOCKS) or "experts"; router: the native router's name, "module" (the
    family's own router kept) or None in experts mode. shards: (this rank, TP world size);
    I_local / Is_local: this rank's columns of the routed / shared intermediate axis; source:
    where the weights came from ("full": whole HF tensors sliced here; "local shards":
    transformers' own TP shards taken as they are; "resharded": gathered and re-cut); replicated:
    the parts of the block that run whole on every rank (experts mode: the block's shared expert);
    note: why a block of a known structure runs in experts mode (its shared expert's activation...).
    ep: (this rank's EP rank, EP world size), (0, 1) without expert parallelism; experts: the
    routed experts this rank keeps, (first, count) (tpmoe.sharding.expert_range: all E without EP)."""

    name: str
    layer: int
    family: str
    mode: str
    pattern: str
    router: Optional[str]
    hf_class: str
    num_experts: int
    top_k: int
    intermediate_size: int
    shards: Tuple[int, int]
    I_local: int
    Is_local: int
    source: str
    replicated: Tuple[str, ...] = ()
    note: str = ""
    ep: Tuple[int, int] = (0, 1)
    experts: Tuple[int, int] = (0, 0)


class ApplyReport(list):
    """The ReplacedBlock of every swapped block, in model order (a list), printable as a table."""

    def __str__(self):
        ep = any(b.ep[1] > 1 for b in self)
        lines = [f"{'layer':>5}  {'family':<16} {'mode':<7} {'E':>4} {'K':>2} {'I':>6} {'I_local':>7}  {'rank/P':<7} "
                 + (f"{'ep/P_ep':<8} {'experts':<11} " if ep else "") + f"{'source':<13} name"]
        for b in self:
            experts = f"[{b.experts[0]}, {b.experts[0] + b.experts[1]})"
            lines.append(f"{b.layer:>5}  {b.family:<16} {b.mode:<7} {b.num_experts:>4} {b.top_k:>2} "
                         f"{b.intermediate_size:>6} {b.I_local:>7}  {b.shards[0]}/{b.shards[1]:<5} "
                         + (f"{b.ep[0]}/{b.ep[1]:<6} {experts:<11} " if ep else "") + f"{b.source:<13} {b.name}")
        return "\n".join(lines)


def _model_tp_group(model: nn.Module):
    """The TP group of a model that transformers' own tensor parallelism loaded, or None."""
    tp_size = getattr(model, "_tp_size", None)
    mesh = getattr(model, "_device_mesh", None)
    if not tp_size or tp_size < 2 or mesh is None:
        return None
    from ..distributed import resolve_tp_group
    from ..distributed.groups import mesh_dims_by_name

    return resolve_tp_group(mesh, mesh_dims_by_name(mesh)[0])


def _find_blocks(model: nn.Module) -> List[Tuple[str, nn.Module, Plan]]:
    """(name, module, plan) of every MoE block; refuses the first one tpmoe cannot run."""
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if not is_moe_block(module):
            continue
        found.append((name, module, plan_for(module, name)))
        inside.append(name)
    return found


def _router_logit_classes(model: nn.Module) -> tuple:
    """The router classes whose output[0] the model records as router_logits (index must be 0)."""
    classes = []
    for module in model.modules():
        specs = getattr(type(module), "_can_record_outputs", None) or {}
        recorders = specs.get("router_logits") if isinstance(specs, dict) else None
        if recorders is None:
            continue
        for recorder in recorders if isinstance(recorders, list) else [recorders]:
            target = getattr(recorder, "target_class", recorder)
            if isinstance(target, type) and getattr(recorder, "index", 0) == 0:
                classes.append(target)
    return tuple(classes)


def _layer_index(name: str, ordinal: int) -> int:
    match = re.search(r"\.(\d+)(\.|$)", name)
    return int(match.group(1)) if match else ordinal


def _block_group(resolved, module, name):
    from ..distributed import group_rank, group_size

    hf_group = dtensor_group(module)
    if hf_group is None:
        return resolved
    if resolved is None:
        return hf_group
    if group_size(resolved) != group_size(hf_group) or group_rank(resolved) != group_rank(hf_group):
        raise ValueError(f"group: rank {group_rank(resolved)} of {group_size(resolved)}, but transformers sharded "
                         f"{name} over a TP mesh where this process is rank {group_rank(hf_group)} of "
                         f"{group_size(hf_group)}")
    return hf_group


def apply(model: nn.Module, group=None, *, tp_mesh_dim=None, ep_mesh_dim=None, ep_group=None, backend: str = "auto",
          jitter_seed: int = 0, check_replicated: bool = False, quantized_experts=None,
          quantized_block_size=None) -> ApplyReport:
    """Replaces every MoE block of `model` (in place) by tpmoe and returns what it replaced.

    group: None (one process; or, for a model that transformers' TP loaded, its TP mesh), a
    ProcessGroup, or a DeviceMesh, read as MoEBlock reads one (tpmoe.distributed.groups.
    mesh_dims_by_name): a dimension named "ep" is expert parallel, one named "tp" tensor parallel,
    any other is left alone (data parallel: its ranks feed their own tokens, and its gradient sum is
    the caller's, as for the rest of the model); tp_mesh_dim / ep_mesh_dim name other dimensions
    for those roles; a 1-D mesh named neither is the TP group. Every rank of the group must call
    apply on the same model. backend: tpmoe.fused_experts'.
    Expert parallelism: by the mesh's "ep" dimension (or ep_mesh_dim), or ep_group= a
    ProcessGroup (group then the TP group or None). Each rank keeps the routed experts of its EP rank (tpmoe.sharding.
    expert_range), each expert's columns sliced over the TP group; the shared expert stays whole
    over EP. The model then runs data-parallel over the EP dimension: each EP rank feeds it ITS
    OWN tokens (any count; the ranks of a TP group the same ones), the blocks exchange them. Per
    step, after backward: tpmoe.distributed.allreduce_router_grads(model) sums the blocks'
    replicated gradients over the EP group; every other parameter of the model (attention,
    embeddings, norms, a family's own router, a shared expert kept in experts mode) is
    data-parallel, summed over the EP group as DDP would (tpmoe.hf.data_parallel_parameters
    lists them). Not for a model loaded with transformers' tp_plan (ValueError).
    jitter_seed: the seed of the random draws inside blocks under TP (module.py); the same int on
    every rank. Raises UnsupportedFamilyError (naming family, class and reason) before changing
    anything if any MoE block is of an unsupported family, ValueError if the model has none.
    quantized_experts: a checkpoint's tensors under transformers' names (tpmoe.hf.
    load_quantized_experts' `tensors`; quantized_block_size its `block_size`): the blocks whose
    experts it holds run them quantized, and the model's own expert weights of those blocks are
    never read (they may be on the meta device: a model built without them). Transformers'
    FP8Experts are read in place without it.
    """
    from .._checks import check_choice
    from ..distributed import communicates, resolve_groups
    from ..fused import BACKENDS
    from .module import StepCounter, SynchronizedRandomness, TpmoeHFBlock, TpmoeHFExperts

    require_transformers()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if isinstance(jitter_seed, bool) or not isinstance(jitter_seed, int):
        raise TypeError(f"jitter_seed: expected an int (the same on every rank), got {type(jitter_seed).__name__}")
    # Checked here too, not only when the first block is built: a bad value then fails before
    # any block is swapped, and also on a model without MoE blocks.
    check_choice(backend, "backend", BACKENDS)
    if not isinstance(check_replicated, bool):
        raise TypeError(f"check_replicated: expected a bool, got {type(check_replicated).__name__} "
                        f"{check_replicated!r}")
    resolved, resolved_ep = resolve_groups(group, tp_mesh_dim, ep_group, ep_mesh_dim)
    if resolved_ep is not None:
        _refuse_tp_plan_with_ep(model)
    if resolved is None and resolved_ep is None:
        # A model loaded with transformers' TP (the "auto" plan of its DistributedConfig) sits on a TP mesh even where its
        # plan leaves a block whole (GPT-OSS's experts in 5.24): those blocks are sharded over it too.
        resolved = _model_tp_group(model)
    blocks = _find_blocks(model)
    if not blocks:
        if any(isinstance(m, (TpmoeHFBlock, TpmoeHFExperts)) for m in model.modules()):
            raise ValueError(f"model: {type(model).__name__} has no HF MoE block left: tpmoe.hf.apply already "
                             f"swapped them")
        raise ValueError(f"model: found no MoE block in {type(model).__name__} (nothing for tpmoe to replace)")
    logit_classes = _router_logit_classes(model)
    # Every block's config and shapes first: a refusal (an activation, a shape) changes nothing.
    checkpoint = _checkpoint_reader(model, quantized_experts, quantized_block_size)
    judged = [_config(module, plan, name, checkpoint) for name, module, plan in blocks]
    if resolved_ep is not None:
        _check_ep_size(blocks, judged, resolved_ep)

    report, drawing = ApplyReport(), []
    modules = dict(model.named_modules())
    for ordinal, ((name, module, plan), (config, weights, quantized)) in enumerate(zip(blocks, judged)):
        block_group = _block_group(resolved, module, name)
        layer = _layer_index(name, ordinal)
        replacement, source = _build(module, plan, config, weights, quantized, block_group, name, layer, backend,
                                     check_replicated, jitter_seed, logit_classes, resolved_ep)
        if plan.mode == "block":
            parent_name, _, child_name = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child_name, replacement)
            if replacement.jitter_noise > 0:
                drawing.append(replacement)
            replicated = ()
        else:
            module.experts = replacement
            replicated = _replicated_parts(module)
            if communicates(block_group):
                # EP x TP: the TP ranks of an EP rank draw alike; EP ranks (other tokens) draw their own.
                sync = SynchronizedRandomness(jitter_seed, layer, stream=replacement.block.ep_rank)
                module.register_forward_pre_hook(sync.before)
                module.register_forward_hook(sync.after)
                drawing.append(sync)
        tp_block = replacement.block
        report.append(ReplacedBlock(
            name=name, layer=layer, family=replacement.family, mode=plan.mode,
            pattern=plan.block.name if plan.mode == "block" else "experts",
            router=(plan.router.name if plan.router else "module") if plan.mode == "block" else None,
            hf_class=type(module).__name__, num_experts=config.num_experts, top_k=config.top_k,
            intermediate_size=config.intermediate_size, shards=(tp_block.tp_rank, tp_block.tp_size),
            I_local=tp_block.I_local, Is_local=tp_block.Is_local, source=source, replicated=replicated,
            note=plan.note, ep=(tp_block.ep_rank, tp_block.ep_size),
            experts=(tp_block.expert_first, tp_block.num_local_experts)))
    if drawing:
        model.register_forward_pre_hook(StepCounter(drawing))
    return report


def _config(module, plan, name, checkpoint=None):
    """The block's MoEConfig, its HF weights' whole shapes checked against it, and its whole
    quantized experts where transformers' quantizer left them or `checkpoint(name, weights)`
    finds them (else None)."""
    from ..quantized import check_whole_quantized_experts
    from .judge import unsupported
    from .registry import Unsupported
    from .shards import check_whole_shapes
    from .weight_map import moe_config_of, weight_map

    owner = plan.replaced(module)
    weights = weight_map(plan, owner)
    try:
        config = moe_config_of(module, plan, weights)
    except (Unsupported, ValueError) as error:
        raise unsupported(module, name, str(error)) from None
    check_whole_shapes(owner, weights, config, _owner_name(name, plan))
    quantized = _quantized_experts(module, plan, name)
    if quantized is None and checkpoint is not None:
        quantized = checkpoint(_owner_name(name, plan), weights)
    if quantized is not None:  # here, before any block is swapped
        check_whole_quantized_experts(quantized, config, argument=f"quantized experts of {name}")
    return config, weights, quantized


def _owner_name(name: str, plan: Plan) -> str:
    """The name of the module whose HF weights tpmoe takes: the block, or its experts module."""
    if plan.mode == "block":
        return name
    return f"{name}.experts" if name else "experts"


def _replicated_parts(module: nn.Module) -> Tuple[str, ...]:
    """The shared or dense MLPs of a block in experts mode: they run whole on every rank."""
    return tuple(child for child, sub in module.named_children()
                 if ("shared" in child or "mlp" in child) and any(True for _ in sub.parameters()))


def _check_ep_size(blocks, judged, ep_group) -> None:
    """Every block has at least one routed expert per EP rank (checked on every rank alike, before
    any block is swapped)."""
    from ..distributed import group_size

    ep_size = group_size(ep_group)
    for (name, module, _), (config, *_) in zip(blocks, judged):
        if config.num_experts < ep_size:
            raise ValueError(f"group: an EP dimension of {ep_size} ranks, but {name} ({type(module).__name__}) has "
                             f"{config.num_experts} routed experts; expected at most {config.num_experts} EP ranks "
                             f"(each owns at least one whole expert): use a smaller EP dimension")


def data_parallel_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The trained parameters of a swapped model outside tpmoe's blocks: attention, embeddings,
    norms, dense MLPs, a family's own router or post-norm kept beside a block, the parts of a block
    kept in experts mode. Under expert parallelism each EP rank runs them on its own tokens, so
    their gradients are partial sums to add over the EP group once per step (as DDP does; e.g.
    tpmoe.distributed.allreduce_gradients(data_parallel_parameters(model), ep_group)). The blocks'
    own replicated parameters are tpmoe.distributed.allreduce_router_grads'; their experts are
    owned by one EP rank each and must not be summed."""
    from .module import TpmoeHFBlock, TpmoeHFExperts

    inside = {id(p) for m in model.modules() if isinstance(m, (TpmoeHFBlock, TpmoeHFExperts))
              for p in m.block.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in inside]


def _refuse_tp_plan_with_ep(model: nn.Module) -> None:
    """Expert parallelism needs each EP rank to run the model on its own tokens, but a model that
    transformers' tp_plan loaded runs its attention and dense layers tensor-parallel, on the SAME
    tokens over its mesh; tpmoe cannot make that a data-parallel dimension, so it refuses."""
    from .shards import is_dtensor

    tp_size = getattr(model, "_tp_size", None)
    if (tp_size and tp_size > 1) or any(is_dtensor(t) for t in list(model.parameters()) + list(model.buffers())):
        raise ValueError(
            f"group: expert parallelism over {type(model).__name__}, which transformers' tp_plan loaded (DTensor "
            f"weights on its TP mesh); expected a model loaded whole (from_pretrained without tp_plan): pass that "
            f"model with an ('ep',) or ('ep', 'tp') DeviceMesh and tpmoe slices its experts itself, or keep the "
            f"tp_plan model and call tpmoe.hf.apply(model) without an EP dimension (tensor parallel over its mesh)")


def _build(module, plan: Plan, config, weights, quantized, group, name, layer, backend, check_replicated, jitter_seed,
           logit_classes, ep_group=None):
    """(the replacement module, its weights' source) for one judged block."""
    from ..block import MoEBlock
    from ..distributed import group_rank, group_size
    from ..quantized_experts import dense_expert_placeholders
    from ..sharding import shard_shapes
    from .code import family_of
    from .module import TpmoeHFBlock, TpmoeHFExperts
    from .quantized import compute_dtype
    from .weight_map import WeightMap

    owner = plan.replaced(module)
    read = weights  # what the model's tensors give; the replacement keeps every name (gather_state_dict)
    if quantized is not None:  # the dense experts are stand-ins the quantized ones replace, never read
        read = WeightMap({k: v for k, v in weights.names.items() if k not in ("w_gate_up", "w_down")},
                         weights.packings)
    shards, source, views = collect_shards(owner, read, config, group, _owner_name(name, plan), ep_group=ep_group)
    hf_tensors = read.hf_tensors(owner)
    trainable = {tp_name: parts[0].requires_grad for tp_name, parts in hf_tensors.items()}
    if quantized is not None:
        shapes = shard_shapes(config, group_rank(group), group_size(group), ep_rank=group_rank(ep_group),
                              ep_size=group_size(ep_group))
        dtype = compute_dtype(module, _experts_module(owner, plan))
        shards.update(dense_expert_placeholders(shapes, dtype, quantized.w_gate_up.device))
    # transformers' local shards become the block's parameters' local tensors without a copy (the
    # HF parameters they belong to leave the model with the module replaced).
    tp_block = MoEBlock.from_shards(config, shards, group=group, ep_group=ep_group, backend=backend,
                                    check_replicated=check_replicated, _uncopied=views, _quantized=quantized)
    if quantized is not None:
        source = f"{source}, {quantized.format}"
    for tp_name, parameter in tp_block.named_parameters(recurse=False):
        parameter.requires_grad_(trainable.get(tp_name, True))
    common = dict(family=family_of(type(module)), hf_class_name=type(module).__name__, layer_index=layer)
    if plan.mode == "experts":
        post_norm = plan.experts.impl.post_norm
        replacement = TpmoeHFExperts(tp_block, weights, **common, post_norm=None if post_norm is None else (
            post_norm, _undistributed(getattr(module.experts, post_norm))),
            identity_experts=plan.experts.impl.identity_experts)
        replacement.train(module.experts.training)
        return replacement, source
    structure = plan.block
    kept = {}
    if plan.router is None:
        kept[structure.router] = getattr(module, structure.router)
        kept.update({arg: getattr(module, arg) for arg in structure.router_args})
    for attribute in (structure.post_norm, structure.output_bias):
        if attribute is not None:
            kept[attribute] = getattr(module, attribute)
    kept = {name: _undistributed(value) for name, value in kept.items()}
    router = getattr(module, structure.router)
    replacement = TpmoeHFBlock(
        tp_block, plan, weights, kept=kept,
        routed_scale=float(getattr(module, structure.routed_scale)) if structure.routed_scale else 1.0,
        jitter_noise=float(getattr(module, "jitter_noise", 0.0) or 0.0) if structure.jitter else 0.0,
        jitter_seed=jitter_seed, jitter_stream=tp_block.ep_rank,
        records_router_logits=plan.router is not None and isinstance(router, logit_classes), **common)
    replacement.train(module.training)
    return replacement, source


def _checkpoint_reader(model, tensors, block_size):
    """None, or (owner name, weight map) -> the whole quantized experts `tensors` hold for that block."""
    if tensors is None:
        if block_size is not None:
            raise ValueError(f"quantized_block_size: expected None without quantized_experts, got {block_size!r}")
        return None
    from .quantized import checkpoint_experts, check_tensors, fp8_block_size

    check_tensors(tensors, "quantized_experts")
    fp8_block = fp8_block_size(model, block_size)

    def read(owner_name, weights):
        return checkpoint_experts(tensors, owner_name, weights, fp8_block, argument="quantized_experts")
    return read


def _experts_module(owner, plan: Plan):
    return owner if plan.mode == "experts" or not plan.block.experts else getattr(owner, plan.block.experts)


def _quantized_experts(module, plan: Plan, name: str):
    """The whole quantized experts transformers put in place of the block's (FP8Experts), or None."""
    if plan.experts.impl.storage != "fp8_block":
        return None
    from .judge import unsupported
    from .quantized import fp8_experts_of
    from .registry import Unsupported

    try:
        return fp8_experts_of(_experts_module(plan.replaced(module), plan), _owner_name(name, plan))
    except Unsupported as error:
        raise unsupported(module, name, str(error)) from None


def _undistributed(value):
    """A kept HF module (or tensor) with plain tensors: it runs replicated beside tpmoe's plain
    activations, and DTensor parameters cannot meet plain tensors in one op. Replicate placements
    give their local copy; any other DTensor is gathered (every rank alike)."""
    import torch

    from .shards import _full_part, is_dtensor

    if isinstance(value, torch.Tensor):
        if not is_dtensor(value):
            return value
        whole = _full_part(value)
        return nn.Parameter(whole, requires_grad=value.requires_grad) if isinstance(value, nn.Parameter) else whole
    for submodule in value.modules():
        for name, parameter in list(submodule.named_parameters(recurse=False)):
            if is_dtensor(parameter):
                setattr(submodule, name, nn.Parameter(_full_part(parameter), requires_grad=parameter.requires_grad))
        for name, buffer in list(submodule.named_buffers(recurse=False)):
            if is_dtensor(buffer):
                submodule.register_buffer(name, _full_part(buffer))
    return value
