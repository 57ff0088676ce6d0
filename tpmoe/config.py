"""The description of one MoE block, shared by the reference, the layers and the adapters."""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import check_choice

SCORINGS = ("softmax", "topk_softmax", "sigmoid_group")
# Appended to only: tpmoe.sharding codes an activation by its index here.
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu", "relu2", "clamped_silu", "silu_clamped",
               "softcapped_swiglu")
# Defined on the (gate, up) pair only: these need gated=True. Every check reads this tuple.
GATED_ONLY_ACTIVATIONS = ("clamped_swiglu", "clamped_silu", "silu_clamped", "softcapped_swiglu")
LAYOUTS = ("concatenated", "interleaved", "gpt_oss")


def check_expert_fields(activation: str, layout: str, gated: bool, prefix: str = "") -> None:
    """The one check of what an expert computes: MoEConfig, ExpertSpec and tpmoe.fused_experts'
    keywords name their argument with `prefix`."""
    check_choice(activation, f"{prefix}activation", ACTIVATIONS)
    check_choice(layout, f"{prefix}layout", LAYOUTS)
    if activation in GATED_ONLY_ACTIVATIONS and not gated:
        raise ValueError(f"{prefix}gated: {activation} is a gated activation, expected gated=True, got {gated!r}")


@dataclass(frozen=True)
class ExpertSpec:
    """What one expert computes, carried as one value from the config to the kernels.

    activation, gated and alpha / limit as in MoEConfig (alpha = swiglu_alpha, limit =
    swiglu_limit); layout: how gate and up are packed (tpmoe.weights). How the weights are
    stored (dense, quantized) is the weights' business, not the spec's: tpmoe.weights.ExpertWeights.
    """

    activation: str = "silu"
    layout: str = "concatenated"
    gated: bool = True
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        check_expert_fields(self.activation, self.layout, self.gated, "ExpertSpec.")
        # The custom ops' schemas take doubles; an int here would fail there, far from its cause.
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "limit", float(self.limit))

    def op_args(self) -> tuple:
        """(activation, layout, gated, alpha, limit): the order every custom op's schema takes
        them in (a schema cannot take a Python object, so the spec is unpacked here, once)."""
        return self.activation, self.layout, self.gated, self.alpha, self.limit

    def keywords(self) -> dict:
        """The spec as tpmoe.fused_experts' / tpmoe.reference_experts' keywords."""
        return dict(activation=self.activation, layout=self.layout, gated=self.gated, alpha=self.alpha,
                    limit=self.limit)

    def with_layout(self, layout: str) -> "ExpertSpec":
        return dataclasses.replace(self, layout=layout)


@dataclass(frozen=True)
class MoEConfig:
    """Sizes are the full (unsharded) ones; a rank's shard sizes derive from them.

    scoring: "softmax" (softmax -> top-k, optional renormalise: Mixtral, Qwen, OLMoE),
    "topk_softmax" (top-k on logits -> softmax over the k: GPT-OSS), "sigmoid_group"
    (sigmoid + correction bias + group-limited top-k -> renormalise -> scaling: DeepSeek-V3).
    layout: how gate and up are packed (see tpmoe.weights for the tensor shapes).
    activation: h = act(gate) * up when gated, act(x) otherwise, for silu, gelu, gelu_tanh, relu
    and relu2 (relu(x)^2); the gated-only ones (GATED_ONLY_ACTIVATIONS) read swiglu_alpha and
    swiglu_limit as follows (the others ignore both; formulas in tpmoe.reference):
        activation          swiglu_alpha          swiglu_limit
        clamped_swiglu      alpha (GPT-OSS)       limit: gate <= limit, up in [-limit, limit]
        clamped_silu        -                     limit: gate <= limit, up in [-limit, limit]
        silu_clamped        -                     limit: silu(gate) <= limit, up in [-limit, limit]
        softcapped_swiglu   gate softcap c_g      up softcap c_u
    weights_on_input: the routing weight scales each expert's INPUT rather than its output
    (Llama-4): y_t = sum_k E_k(w_tk x_t) (+ shared expert).
    external_router: the block holds no router weights; its forward takes the routing (the
    logits, weights and ids of a router that runs outside, replicated on every rank, such as a
    transformers family's own router module). scoring and its fields are then unused.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    correction_bias: bool = False
    # DeepSeek-V3 computes its router in float32 whatever the model dtype.
    router_dtype: Optional[torch.dtype] = None
    activation: str = "silu"
    gated: bool = True
    layout: str = "concatenated"
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    external_router: bool = False
    weights_on_input: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoEConfig.{name}: expected a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k: expected <= num_experts ({self.num_experts}), got {self.top_k}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"MoEConfig.scoring: expected one of {SCORINGS}, got {self.scoring!r}")
        check_expert_fields(self.activation, self.layout, self.gated, "MoEConfig.")
        if self.scoring != "sigmoid_group" and (self.correction_bias or self.n_group != 1 or self.topk_group != 1):
            raise ValueError("MoEConfig.scoring: correction_bias, n_group and topk_group belong to 'sigmoid_group' "
                             f"routing, got them with scoring={self.scoring!r}")
        if self.num_experts % self.n_group != 0:
            raise ValueError(
                f"MoEConfig.n_group: expected a divisor of num_experts ({self.num_experts}), got {self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group: expected <= n_group ({self.n_group}), got {self.topk_group}")
        if self.shared_intermediate_size < 0:
            raise ValueError(
                f"MoEConfig.shared_intermediate_size: expected >= 0, got {self.shared_intermediate_size}")
        if self.weights_on_input and self.expert_bias:
            raise ValueError("MoEConfig.weights_on_input: experts with biases are weighted at their output in every "
                             "family that has them, got expert_bias=True with weights_on_input=True")
        if self.external_router and (self.router_bias or self.correction_bias):
            raise ValueError("MoEConfig.external_router: the block holds no router weights, got router_bias="
                             f"{self.router_bias}, correction_bias={self.correction_bias}")
        if self.shared_expert_gate and self.shared_intermediate_size == 0:
            raise ValueError("MoEConfig.shared_expert_gate: needs a shared expert (shared_intermediate_size > 0)")

    @property
    def expert_spec(self) -> ExpertSpec:
        """The routed experts' spec; the shared expert's is this one with_layout("concatenated")."""
        return ExpertSpec(self.activation, self.layout, self.gated, self.swiglu_alpha, self.swiglu_limit)

    @property
    def gate_up_rows(self) -> int:
        """Rows of one expert's gate_up projection: 2I when gated, I otherwise."""
        return (2 if self.gated else 1) * self.intermediate_size
