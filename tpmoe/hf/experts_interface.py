"""`experts_implementation="tpmoe"`: tpmoe.fused_experts as a transformers experts implementation.

transformers 5.x dispatches every `@use_experts_implementation` experts module through
`transformers.integrations.moe.ExpertsInterface` (keys "eager", "grouped_mm", ...). After
`register_experts_implementation()` the key "tpmoe" runs the module's own weights through
tpmoe.fused_experts: the HF router and block stay HF's, only the experts loop is ours. It is
one process's drop-in (or runs on the local shards transformers' own TP hands the experts
module); `tpmoe.hf.apply` is the full replacement with tpmoe's tensor parallelism.

The experts module describes its layout in the attributes the decorator sets:
  has_gate      gated (gate_up_proj) or not (up_proj)
  is_concatenated / is_transposed: concatenated [E, 2I, H]; interleaved [E, 2I, H];
                interleaved + transposed [E, H, 2I] (GPT-OSS, "gpt_oss")
  has_bias      gate_up_proj_bias / down_proj_bias
  _apply_gate   GPT-OSS's clamped swiglu (alpha, limit) where the class overrides it
  has_post_expert_norm: a norm after each expert, which tpmoe does not have -> error.
"""
import torch

from ..fused import fused_experts
from .families import UnsupportedFamilyError, _activation_of, require_transformers

EXPERTS_IMPLEMENTATION = "tpmoe"


def _layout_of(experts) -> str:
    concatenated, transposed = experts.is_concatenated, experts.is_transposed
    if concatenated and not transposed:
        return "concatenated"
    if not concatenated and transposed:
        return "gpt_oss"
    if not concatenated:
        return "interleaved"
    raise UnsupportedFamilyError(f"{type(experts).__name__}: concatenated AND transposed experts weights have no "
                                 f"tpmoe layout")


def _activation_options(experts):
    from transformers.integrations.moe import _default_apply_gate

    # The decorator installs _default_apply_gate (act(gate) * up) on classes without their own.
    if getattr(type(experts), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        # The one custom gate of transformers 5.23 is GPT-OSS's clamped swiglu, which carries these.
        if not (hasattr(experts, "alpha") and hasattr(experts, "limit")):
            raise UnsupportedFamilyError(f"{type(experts).__module__}.{type(experts).__name__}: a custom _apply_gate "
                                         f"that is not GPT-OSS's clamped swiglu (no alpha/limit)")
        return dict(activation="clamped_swiglu", alpha=float(experts.alpha), limit=float(experts.limit))
    return dict(activation=_activation_of(experts.act_fn, type(experts).__name__))


def tpmoe_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """ExpertsInterface entry: (experts module, x [T, H], ids [T, K], weights [T, K]) -> [T, H]."""
    if getattr(self, "has_post_expert_norm", False):
        raise UnsupportedFamilyError(f"{type(self).__name__}: experts with a post-expert norm have no tpmoe path")
    if getattr(self, "_is_expert_parallel", False):
        raise UnsupportedFamilyError(f"{type(self).__name__}: expert parallelism (sentinel expert ids) is not "
                                     f"supported by experts_implementation='tpmoe'; use tpmoe.hf.apply for TP")
    gated = bool(self.has_gate)
    w_gate_up = self.gate_up_proj if gated else self.up_proj
    b_gate_up = b_down = None
    if self.has_bias:
        b_gate_up = self.gate_up_proj_bias if gated else self.up_proj_bias
        b_down = self.down_proj_bias
    output = fused_experts(hidden_states, w_gate_up, self.down_proj, top_k_index, top_k_weights,
                           layout=_layout_of(self), gated=gated, b_gate_up=b_gate_up, b_down=b_down,
                           **_activation_options(self))
    return output.to(hidden_states.dtype)


def register_experts_implementation() -> str:
    """Registers "tpmoe" in transformers' ExpertsInterface (global: every model of the process sees
    it) and returns the key. Idempotent. Then:
        model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="tpmoe")
    or model.set_experts_implementation("tpmoe")."""
    require_transformers()
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, tpmoe_experts_forward)
    return EXPERTS_IMPLEMENTATION
