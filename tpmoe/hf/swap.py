"""`tpmoe.hf.apply`: find every MoE block of a transformers model and swap it for a tpmoe block."""
import re
from dataclasses import dataclass
from typing import List, Tuple

from torch import nn

from .families import is_moe_block, match_pattern, require_transformers, unsupported_error
from .shards import collect_shards, dtensor_group


@dataclass(frozen=True)
class ReplacedBlock:
    """One swapped block. shards: (this rank, TP world size); I_local / Is_local: this rank's
    columns of the routed / shared intermediate axis; source: where the weights came from
    ("full": a full HF tensor sliced here; "local shards": transformers' own TP shards taken as
    they are; "resharded": transformers' shards gathered and re-cut to tpmoe's sizes)."""

    name: str
    layer: int
    family: str
    pattern: str
    hf_class: str
    num_experts: int
    top_k: int
    intermediate_size: int
    shards: Tuple[int, int]
    I_local: int
    Is_local: int
    source: str


class ApplyReport(list):
    """The ReplacedBlock of every swapped block, in model order (a list), printable as a table."""

    def __str__(self):
        lines = [f"{'layer':>5}  {'family':<14} {'E':>4} {'K':>2} {'I':>6} {'I_local':>7}  {'rank/P':<7} "
                 f"{'source':<13} name"]
        for b in self:
            lines.append(f"{b.layer:>5}  {b.family:<14} {b.num_experts:>4} {b.top_k:>2} {b.intermediate_size:>6} "
                         f"{b.I_local:>7}  {b.shards[0]}/{b.shards[1]:<5} {b.source:<13} {b.name}")
        return "\n".join(lines)


def _resolve_group(group, tp_mesh_dim):
    from torch.distributed.device_mesh import DeviceMesh

    from ..distributed import resolve_tp_group

    if isinstance(group, DeviceMesh) and group.ndim > 1 and tp_mesh_dim is None:
        names = group.mesh_dim_names or ()
        if "tp" not in names:
            raise ValueError(f"group: an N-D DeviceMesh needs tp_mesh_dim (or a dimension named 'tp'), "
                             f"got dims {names}")
        tp_mesh_dim = "tp"
    return resolve_tp_group(group, tp_mesh_dim)


def _find_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every MoE block; refuses the first one of no supported pattern."""
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if not is_moe_block(module):
            continue
        if match_pattern(module) is None:
            raise unsupported_error(module, name)
        found.append((name, module))
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


def apply(model: nn.Module, group=None, *, tp_mesh_dim=None, backend: str = "auto", jitter_seed: int = 0,
          check_replicated: bool = False) -> ApplyReport:
    """Replaces every MoE block of `model` (in place) by a tpmoe block and returns what it replaced.

    group: None (one process; or, for a model that transformers' TP sharded, its TP mesh),
    a ProcessGroup, or a DeviceMesh (1-D, or N-D with tp_mesh_dim / a dimension named "tp").
    Every rank of the group must call apply on the same model. backend: tpmoe.fused_experts'.
    jitter_seed: the seed of router jitter noise (module.py); the same int on every rank.
    Raises UnsupportedFamilyError (naming family and class) before changing anything if any
    MoE block is of an unsupported family, ValueError if the model has no MoE block.
    """
    from .._checks import check_choice
    from ..block import MoEBlock
    from ..distributed import group_rank, group_size
    from ..fused import BACKENDS
    from .families import hf_weight_names, moe_config_of
    from .module import JitterStep, TpmoeHFBlock

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
    resolved = _resolve_group(group, tp_mesh_dim)
    blocks = _find_blocks(model)
    if not blocks:
        if any(isinstance(m, TpmoeHFBlock) for m in model.modules()):
            raise ValueError(f"model: {type(model).__name__} has no HF MoE block left: tpmoe.hf.apply already "
                             f"swapped them")
        raise ValueError(f"model: found no MoE block in {type(model).__name__} (nothing for tpmoe to replace)")
    logit_classes = _router_logit_classes(model)
    # Every block's config first: a refusal (activation, shared-expert variant) changes nothing.
    matched = [(name, module, match_pattern(module)) for name, module in blocks]
    configs = [moe_config_of(module, pattern, name) for name, module, pattern in matched]

    report, jittered = ApplyReport(), []
    modules = dict(model.named_modules())
    for ordinal, ((name, module, pattern), config) in enumerate(zip(matched, configs)):
        block_group = resolved
        hf_group = dtensor_group(module)
        if hf_group is not None:
            if block_group is None:
                block_group = hf_group
            elif group_size(block_group) != group_size(hf_group) or group_rank(block_group) != group_rank(hf_group):
                raise ValueError(f"group: rank {group_rank(block_group)} of {group_size(block_group)}, but "
                                 f"transformers sharded {name} over a TP mesh where this process is rank "
                                 f"{group_rank(hf_group)} of {group_size(hf_group)}")
        shards, source = collect_shards(module, pattern, config, block_group)
        hf_names = hf_weight_names(pattern)
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        hf_rows = {tp: [tensors[n].shape[0] for n in names] for tp, names in hf_names.items()}
        trainable = {tp: tensors[names[0]].requires_grad for tp, names in hf_names.items()}
        tp_block = MoEBlock.from_shards(config, shards, group=block_group, backend=backend,
                                                check_replicated=check_replicated)
        for tp_name, parameter in tp_block.named_parameters(recurse=False):
            parameter.requires_grad_(trainable.get(tp_name, True))
        router = getattr(module, pattern.router_attr)
        replacement = TpmoeHFBlock(
            tp_block, pattern, family=_family(module), hf_class_name=type(module).__name__,
            layer_index=_layer_index(name, ordinal),
            jitter_noise=float(getattr(module, "jitter_noise", 0.0) or 0.0) if pattern.jitter else 0.0,
            jitter_seed=jitter_seed, records_router_logits=isinstance(router, logit_classes),
            hf_weight_names=hf_names, hf_weight_rows=hf_rows)
        replacement.train(module.training)
        parent_name, _, child_name = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child_name, replacement)
        if replacement.jitter_noise > 0:
            jittered.append(replacement)
        report.append(ReplacedBlock(
            name=name, layer=replacement.layer_index, family=replacement.family, pattern=pattern.name,
            hf_class=type(module).__name__, num_experts=config.num_experts, top_k=config.top_k,
            intermediate_size=config.intermediate_size, shards=(tp_block.tp_rank, tp_block.tp_size),
            I_local=tp_block.I_local, Is_local=tp_block.Is_local, source=source))
    if jittered:
        model.register_forward_pre_hook(JitterStep(jittered))
    return report


def _family(module) -> str:
    from .families import _family_of
    return _family_of(type(module))
