"""A judged block's tpmoe.MoEConfig and where each of its tpmoe weights lives in the HF module.

The module tpmoe replaces is the whole block (Plan mode "block") or its experts module
("experts"); HF names are relative to it. How HF tensors make one tpmoe weight (a Packing):
  concatenated along dim 0   the shared expert's gate_proj and up_proj are its shared_gate_up;
  transposed                 transformers' transposed concatenated experts ([E, H, 2I], Aria,
                             Llama-4) are tpmoe's [E, 2I, H];
  dbrx                       DBRX's w1 / v1 / w2, each [E * I, H]: gate and up per expert, and
                             the down projection stored as h @ w2;
  leading experts            LongCat's gate_up_proj holds rows for its zero-compute experts too,
                             never used: tpmoe takes the routed ones and keeps the rest as it is.
Every packing goes both ways bit for bit (gather_state_dict writes the HF tensors back).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import MoEConfig
from .judge import Plan


@dataclass(frozen=True)
class Packing:
    """How the HF parts of one tpmoe weight pack into it. kind: "rows" (concatenated along dim 0,
    the parts' row counts in rows), "transposed", "dbrx_gate_up" / "dbrx_down" (experts, rows
    per expert), "leading" (the first `experts` rows; `rest` keeps the others)."""

    kind: str = "rows"
    rows: Tuple[int, ...] = ()
    experts: int = 0
    rest: Optional[torch.Tensor] = None

    def to_tpmoe(self, parts: List[torch.Tensor]) -> torch.Tensor:
        if self.kind == "transposed":
            return parts[0].transpose(-1, -2)
        if self.kind == "dbrx_gate_up":
            return torch.cat([part.reshape(self.experts, -1, part.shape[-1]) for part in parts], dim=1)
        if self.kind == "dbrx_down":
            return parts[0].reshape(self.experts, -1, parts[0].shape[-1]).transpose(1, 2)
        if self.kind == "leading":
            return parts[0][:self.experts]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def to_hf(self, full: torch.Tensor) -> List[torch.Tensor]:
        if self.kind == "transposed":
            return [full.transpose(-1, -2).contiguous()]
        if self.kind == "dbrx_gate_up":
            gate, up = full.chunk(2, dim=1)
            return [gate.reshape(-1, full.shape[-1]).contiguous(), up.reshape(-1, full.shape[-1]).contiguous()]
        if self.kind == "dbrx_down":
            return [full.transpose(1, 2).reshape(-1, full.shape[1]).contiguous()]
        if self.kind == "leading":
            return [torch.cat([full, self.rest.to(full.device)])]
        return [part.contiguous() for part in torch.split(full, list(self.rows), dim=0)]

    def whole_shape(self, parts) -> Tuple[int, ...]:
        """The tpmoe weight's shape from the parts' (global) shapes alone."""
        shapes = [tuple(part.shape) for part in parts]
        if self.kind == "transposed":
            return shapes[0][:-2] + (shapes[0][-1], shapes[0][-2])
        if self.kind == "dbrx_gate_up":
            return (self.experts, sum(s[0] for s in shapes) // self.experts, shapes[0][-1])
        if self.kind == "dbrx_down":
            return (self.experts, shapes[0][-1], shapes[0][0] // self.experts)
        if self.kind == "leading":
            return (self.experts,) + shapes[0][1:]
        return (sum(s[0] for s in shapes),) + shapes[0][1:]


@dataclass(frozen=True)
class WeightMap:
    names: Dict[str, Tuple[str, ...]]                       # tpmoe name -> HF names
    packings: Dict[str, Packing] = field(default_factory=dict)

    def hf_tensors(self, module: nn.Module) -> Dict[str, List[torch.Tensor]]:
        """tpmoe name -> the module's HF tensors (parameters, buffers or DTensors; not copied)."""
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        return {name: [tensors[hf_name] for hf_name in hf_names] for name, hf_names in self.names.items()}

    def packing(self, name: str) -> Packing:
        return self.packings[name]

    def to_tpmoe(self, name: str, parts: List[torch.Tensor]) -> torch.Tensor:
        return self.packings[name].to_tpmoe(parts)

    def to_hf(self, name: str, full: torch.Tensor) -> Dict[str, torch.Tensor]:
        """HF name -> tensor for one full tpmoe weight."""
        return dict(zip(self.names[name], self.packings[name].to_hf(full)))

    def plain(self, name: str) -> bool:
        """Whether the HF tensors are tpmoe's own slicing axis unchanged (a DTensor shard may be taken as it is)."""
        return self.packings[name].kind == "rows"


def _names(plan: Plan) -> Dict[str, Tuple[str, ...]]:
    experts = plan.experts.hf_names()
    if plan.mode == "experts":
        return experts
    prefix = f"{plan.block.experts}." if plan.block.experts else ""
    names = {name: tuple(f"{prefix}{n}" for n in hf) for name, hf in experts.items()}
    if plan.router is not None:
        names.update({name: (f"{plan.block.router}.{n}",) for name, n in plan.router.names.items()})
    if plan.shared is not None:
        names.update({name: tuple(f"{plan.shared.attribute}.{n}" for n in hf)
                      for name, hf in plan.shared.impl.names.items()})
        if plan.shared.gate_attribute is not None:
            names["shared_gate"] = (f"{plan.shared.gate_attribute}.weight",)
    return names


def weight_map(plan: Plan, owner: nn.Module) -> WeightMap:
    """The WeightMap of a judged block; owner: the module tpmoe replaces (block or experts)."""
    names = _names(plan)
    tensors = WeightMap(names).hf_tensors(owner)
    storage = plan.experts.impl.storage
    experts_owner = owner if plan.mode == "experts" or not plan.block.experts else getattr(owner, plan.block.experts)
    packings = {}
    for name, parts in tensors.items():
        packing = Packing(rows=tuple(part.shape[0] for part in parts))
        if name in plan.experts.transposed_names:
            packing = Packing("transposed")
        elif storage == "dbrx" and name in ("w_gate_up", "w_down"):
            packing = Packing("dbrx_gate_up" if name == "w_gate_up" else "dbrx_down",
                              experts=int(experts_owner.num_experts))
        elif storage == "leading" and name == "w_gate_up":
            from .shards import _full_part

            routed = int(experts_owner.down_proj.shape[0])
            packing = Packing("leading", experts=routed, rest=_full_part(parts[0])[routed:].clone())
        packings[name] = packing
    return WeightMap(names, packings)


def _top_k(module: nn.Module, plan: Plan, num_experts: int) -> int:
    """The router's k, read where the families keep it; only the routing itself uses it."""
    holders = [getattr(module, plan.block.router, None)] if plan.block else []
    holders += [getattr(module, name, None) for name in ("gate", "router")] + [module]
    for holder in holders:
        for attribute in ("top_k", "num_experts_per_tok"):
            value = getattr(holder, attribute, None)
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= num_experts:
                return value
    return 1


def moe_config_of(module: nn.Module, plan: Plan, weights: WeightMap) -> MoEConfig:
    """The tpmoe.MoEConfig of a judged block, from its modules' attributes and the whole (global)
    shapes of its weights (DTensor parameters report their global shapes)."""
    e = plan.experts
    owner = plan.replaced(module)
    tensors = weights.hf_tensors(owner)
    up_shape = weights.packing("w_gate_up").whole_shape(tensors["w_gate_up"])
    if e.layout == "gpt_oss":
        num_experts, hidden, rows = up_shape
    else:
        num_experts, rows, hidden = up_shape
    common = dict(hidden_size=hidden, intermediate_size=rows // 2 if e.gated else rows, num_experts=num_experts,
                  top_k=_top_k(module, plan, num_experts), activation=e.activation, gated=e.gated, layout=e.layout,
                  expert_bias=e.bias, swiglu_alpha=e.alpha, swiglu_limit=e.limit)
    if plan.mode == "experts":
        return MoEConfig(external_router=True, **common)
    shared_size = 0
    if plan.shared is not None:
        shared_size = weights.packing("shared_down").whole_shape(tensors["shared_down"])[1]
    routing = plan.router.read(getattr(module, plan.block.router)) if plan.router else dict(external_router=True)
    return MoEConfig(shared_intermediate_size=shared_size, weights_on_input=plan.block.weights_on_input,
                     shared_expert_gate=plan.shared is not None and plan.shared.gate_attribute is not None,
                     **routing, **common)
