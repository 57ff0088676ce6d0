"""`experts_implementation="tpmoe"`: tpmoe.routed_experts as a transformers experts implementation.

transformers 5.x dispatches every `@use_experts_implementation` experts module through
`transformers.integrations.moe.ExpertsInterface` (keys "eager", "grouped_mm", ...). After
`register_experts_implementation()` the key "tpmoe" runs the module's own weights through
tpmoe.routed_experts: the HF router and block stay HF's, only the experts loop is ours. It is
one process's drop-in (or runs on the local shards transformers' own TP hands the experts
module); `tpmoe.hf.apply` is the full replacement with tpmoe's tensor parallelism.

The module's layout and activation are judged as `apply` judges them (tpmoe/hf/judge.py:
its verified eager loop, its `_apply_gate`, its act_fn); a module tpmoe cannot run raises
UnsupportedFamilyError with the reason.
"""
import torch

from ..fused import routed_experts
from ..weights import ExpertWeights
from .judge import Plan, UnsupportedFamilyError, experts_plan
from .registry import Unsupported
from .swap import require_transformers
from .weight_map import weight_map

EXPERTS_IMPLEMENTATION = "tpmoe"


def tpmoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """ExpertsInterface entry: (experts module, x [T, H], ids [T, K], weights [T, K]) -> [T, H]."""
    try:
        plan = experts_plan(self)
    except Unsupported as error:
        raise UnsupportedFamilyError(f"experts_implementation='tpmoe': {error}") from None
    weights = weight_map(Plan("experts", plan), self)
    tensors = {name: weights.to_tpmoe(name, parts).contiguous() for name, parts in weights.hf_tensors(self).items()}
    experts = ExpertWeights(tensors["w_gate_up"], tensors["w_down"], tensors.get("b_gate_up"), tensors.get("b_down"))
    if plan.impl.post_norm is None:
        output = routed_experts(hidden_states, experts, top_k_index, top_k_weights, plan.spec)
        return output.to(hidden_states.dtype)
    # Each expert's output normalised before its weight: one row per (token, k) pair.
    num_tokens, top_k = top_k_index.shape
    pairs = hidden_states.repeat_interleave(top_k, dim=0)
    outputs = routed_experts(pairs, experts, top_k_index.reshape(-1, 1), pairs.new_ones(num_tokens * top_k, 1),
                             plan.spec)
    outputs = getattr(self, plan.impl.post_norm)(outputs).view(num_tokens, top_k, -1)
    return (outputs * top_k_weights[..., None].to(outputs.dtype)).sum(dim=1).to(hidden_states.dtype)


def register_experts_implementation() -> str:
    """Registers "tpmoe" in transformers' ExpertsInterface (global: every model of the process sees
    it) and returns the key. Idempotent. Then:
        model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="tpmoe")
    or model.set_experts_implementation("tpmoe")."""
    require_transformers()
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, tpmoe_experts_forward)
    return EXPERTS_IMPLEMENTATION
