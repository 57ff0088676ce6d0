"""Every piece of transformers MoE code tpmoe has verified, as data.

A piece is named by a reference class of transformers (family, class); its code, normalised
(tpmoe/hf/code.py), is the key other classes are compared with. A block is judged piece by
piece (tpmoe/hf/judge.py):

  EXPERTS  eager experts loops that compute y_t = sum_k w_tk E_k(x_t), with the layout they
           read their weights in and how they apply the gate;
  GATES    `_apply_gate` methods (and the activation modules they call): which tpmoe
           activation each is, with its parameters;
  SHARED   shared-expert MLPs (gate/up/down projections) and their activation;
  ROUTERS  routers whose math tpmoe.routing implements natively (the fast path);
  BLOCKS   block forwards whose structure tpmoe.MoEBlock reproduces: routed experts, an
           optional shared expert (optionally behind a sigmoid gate), an optional output scale
           and norm. A block of such a structure is replaced whole, shared expert included
           (ONE all-reduce for both); its router is either a native one or the family's own
           router module, kept and run replicated;
  CONFIGS  config classes tpmoe writes a MoEConfig into, to build a family's block at given sizes.

A block whose forward is not in BLOCKS but whose experts are in EXPERTS keeps its own forward
and has only its experts module replaced ("experts" mode): the rest of the block (router,
shared expert, norms, projections, identity experts...) runs as transformers wrote it,
replicated on every rank, and the experts carry the one all-reduce. Adding a family whose code
is new is one entry here (and one line of test sizes in tests/support/hf_families.py).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

# --------------------------------------------------------------------------- experts


@dataclass(frozen=True)
class ExpertsImpl:
    """An eager experts forward. gate: "inline" (act_fn(gate) * up written in the loop),
    "apply_gate" (self._apply_gate, judged by GATES) or "none" (non-gated: act_fn(up_proj x)).
    concatenated / transposed / bias: how its weights are stored (transformers' own flags of
    @use_experts_implementation): gate and up halves [gate; up] or interleaved (g0, u0, g1...),
    [E, out, in] or transposed [E, in, out], per-expert biases."""

    family: str
    class_name: str
    gate: str
    concatenated: bool = True
    transposed: bool = False
    bias: bool = False
    # The loop takes inputs already scaled by the routing weights, for every expert (Llama-4's
    # batched matmul): only a BLOCKS structure with weights_on_input can run it.
    weighted_inputs: bool = False
    # The module normalising each expert's output before the weighting (has_post_expert_norm).
    post_norm: Optional[str] = None
    # How the weights are stored beyond the flags (tpmoe/hf/weight_map.py): "fused" 3-D tensors,
    # DBRX's "dbrx" [E * I, H] matrices, LongCat's "leading" (gate_up rows past the routed experts).
    storage: str = "fused"
    act: str = "act_fn"   # the attribute path of the activation module
    # Ids at or past the experts of down_proj pick identity experts: w * x (LongCat-Flash's
    # zero-compute experts), a replicated term tpmoe adds after the reduction.
    identity_experts: bool = False


EXPERTS: Tuple[ExpertsImpl, ...] = (
    ExpertsImpl("qwen3_moe", "Qwen3MoeExperts", gate="inline"),
    # The loop through self._apply_gate (Beam, GLM-5-Next, HY-V4, MiniMax-M3-VL, DeepSeek-V4, Step-3.7).
    ExpertsImpl("glm5_next", "Glm5NextTextExperts", gate="apply_gate"),
    # Inkling-2 accumulates the k outputs in float32 (the same sum in a float32 model).
    ExpertsImpl("inkling2", "Inkling2Experts", gate="apply_gate"),
    ExpertsImpl("gpt_oss", "GptOssExperts", gate="apply_gate", concatenated=False, transposed=True, bias=True),
    ExpertsImpl("aria", "AriaExperts", gate="inline", transposed=True),
    ExpertsImpl("openai_privacy_filter", "OpenAIPrivacyFilterExperts", gate="apply_gate", transposed=True,
                bias=True),
    ExpertsImpl("nemotron_h", "NemotronHExperts", gate="none"),
    ExpertsImpl("llama4", "Llama4TextExperts", gate="inline", transposed=True, weighted_inputs=True),
    # Muse-Spark: each expert's output through one shared norm module, then weighted.
    ExpertsImpl("muse_spark", "MuseSparkExperts", gate="inline", post_norm="post_expert_norm"),
    # transformers' fine-grained FP8 experts (its FP8 quantizer's replacement of a family's experts): the
    # e4m3 values and their block scales are read in place as tpmoe's "fp8_block" (tpmoe/hf/quantized.py).
    ExpertsImpl("integrations.finegrained_fp8", "FP8Experts", gate="apply_gate", storage="fp8_block"),
    ExpertsImpl("dbrx", "DbrxExperts", gate="inline", storage="dbrx", act="mlp.activation_fn"),
    # LongCat-Flash: ids at or past the routed experts are identity experts; gate_up_proj has
    # (unused) rows for them too.
    ExpertsImpl("longcat_flash", "LongcatFlashExperts", gate="inline", storage="leading", identity_experts=True),
    # JetMoE: the experts are the block's own input_linear / output_linear, its loop in the block
    # forward (BLOCKS "jetmoe"), its activation the block's `activation`.
    ExpertsImpl("jetmoe", "JetMoeMoE", gate="inline", storage="jetmoe", act="activation"),
)

# --------------------------------------------------------------------------- gates


class Unsupported(TypeError):
    """A verified piece of code with a configuration tpmoe cannot run (an activation, a limit)."""


def _limit(value, what: str) -> float:
    if value is None:
        raise Unsupported(f"{what} is None")
    return float(value)


@dataclass(frozen=True)
class GateImpl:
    """An `_apply_gate` (its class, or "integrations.moe" for transformers' default) and how it
    reads: split ("concatenated": gate_up.chunk(2); "interleaved": [..., ::2] / [..., 1::2])
    and read(experts, activation_of) -> (tpmoe activation, alpha, limit)."""

    family: str
    class_name: str
    split: str
    read: Callable
    activation_modules: Tuple[Tuple[str, str], ...] = ()  # modules of act_fn whose code must be these


def plain_activation(experts, activation_of, act: str = "act_fn"):
    module = experts
    for part in act.split("."):
        module = getattr(module, part)
    return activation_of(module), 1.702, 7.0


def _silu_only(experts, activation_of, what: str) -> None:
    activation = activation_of(experts.act_fn)
    if activation != "silu":
        raise Unsupported(f"{what} around act_fn {activation!r}: tpmoe has it for silu only")


def _clamp_before(limit_attribute: str, check_act: bool):
    def read(experts, activation_of):
        if check_act:
            _silu_only(experts, activation_of, "the clamp of gate and up before the activation")
        return "clamped_silu", 1.702, _limit(getattr(experts, limit_attribute), limit_attribute)
    return read


def _clamp_after(experts, activation_of):
    if experts.limit is None:  # the family's code skips the clamps then
        return plain_activation(experts, activation_of)
    _silu_only(experts, activation_of, "the clamp of the activated gate and of up")
    return "silu_clamped", 1.702, float(experts.limit)


def _gpt_oss_glu(alpha_attribute: str, limit_attribute: str):
    def read(experts, activation_of):
        return ("clamped_swiglu", _limit(getattr(experts, alpha_attribute), alpha_attribute),
                _limit(getattr(experts, limit_attribute), limit_attribute))
    return read


def _fp8_experts_gate(experts, activation_of):
    """FP8Experts' _apply_gate: one method for every family it replaces, its branch taken from the
    instance (the replaced family's config)."""
    if experts.gate_softcap is not None:
        return "softcapped_swiglu", float(experts.gate_softcap), _limit(experts.up_softcap, "up_softcap")
    if experts.swiglu_alpha is not None:
        return "clamped_swiglu", float(experts.swiglu_alpha), _limit(experts.limit, "limit")
    if experts.limit is not None:
        _silu_only(experts, activation_of, "FP8Experts' clamps")
        return ("silu_clamped" if experts.limit_after_act else "clamped_silu"), 1.702, float(experts.limit)
    return plain_activation(experts, activation_of)


def _softcapped(experts, activation_of):
    act = experts.act_fn
    return "softcapped_swiglu", float(act.gate_softcap.softcap), float(act.up_softcap.softcap)


DEFAULT_GATE = ("integrations.moe", "_default_apply_gate")

GATES: Tuple[GateImpl, ...] = (
    GateImpl(*DEFAULT_GATE, split="concatenated", read=plain_activation),
    # act_fn on float32 gate and up, cast back: the same values tpmoe's kernels compute in float32.
    GateImpl("beam", "BeamExperts", split="concatenated", read=plain_activation),
    GateImpl("gpt_oss", "GptOssExperts", split="interleaved", read=_gpt_oss_glu("alpha", "limit")),
    GateImpl("minimax_m3_vl", "MiniMaxM3VLExperts", split="concatenated",
             read=_gpt_oss_glu("swiglu_alpha", "swiglu_limit")),
    GateImpl("openai_privacy_filter", "OpenAIPrivacyFilterExperts", split="concatenated",
             read=_gpt_oss_glu("alpha", "limit")),
    GateImpl("glm5_next", "Glm5NextTextExperts", split="concatenated", read=_clamp_before("swiglu_limit", False)),
    GateImpl("deepseek_v4", "DeepseekV4Experts", split="concatenated", read=_clamp_before("limit", True)),
    GateImpl("step3p7", "Step3p7Experts", split="concatenated", read=_clamp_after),
    GateImpl("integrations.finegrained_fp8", "FP8Experts", split="concatenated", read=_fp8_experts_gate),
    GateImpl("inkling2", "Inkling2Experts", split="concatenated", read=_softcapped,
             activation_modules=(("inkling2", "Inkling2SoftcappedSwiGLU"), ("inkling2", "Inkling2Softcap"))),
)

# --------------------------------------------------------------------------- shared experts


@dataclass(frozen=True)
class SharedImpl:
    """A shared-expert MLP: read(mlp, activation_of) -> (activation, alpha, limit); names: tpmoe
    weight -> the MLP's parameters (concatenated along dim 0)."""

    family: str
    class_name: str
    read: Callable
    names: Dict[str, Tuple[str, ...]] = field(default_factory=lambda: {
        "shared_gate_up": ("gate_proj.weight", "up_proj.weight"), "shared_down": ("down_proj.weight",)})


SHARED: Tuple[SharedImpl, ...] = (
    SharedImpl("deepseek_v3", "DeepseekV3MLP", read=plain_activation),
    SharedImpl("glm5_next", "Glm5NextTextMLP", read=_clamp_before("swiglu_limit", True)),
    SharedImpl("deepseek_v4", "DeepseekV4MLP", read=_clamp_before("limit", True)),
    SharedImpl("step3p7", "Step3p7MLP", read=_clamp_after),
    SharedImpl("llama4", "Llama4TextMLP", read=lambda mlp, activation_of: (activation_of(mlp.activation_fn), 1.702,
                                                                           7.0)),
    SharedImpl("minimax_m3_vl", "MiniMaxM3VLDenseMLP", read=_gpt_oss_glu("swiglu_alpha", "swiglu_limit"),
               names={"shared_gate_up": ("gate_up_proj.weight",), "shared_down": ("down_proj.weight",)}),
)

# --------------------------------------------------------------------------- native routers


@dataclass(frozen=True)
class RouterImpl:
    """A router whose math tpmoe.routing implements: read(router) -> MoEConfig routing fields;
    names: tpmoe weight -> the router's parameter or buffer."""

    name: str
    family: str
    class_name: str
    read: Callable
    names: Dict[str, str] = field(default_factory=lambda: {"router_weight": "weight"})


def _softmax(renormalize: Optional[bool]):
    def read(router):
        return dict(scoring="softmax",
                    renormalize=bool(router.norm_topk_prob) if renormalize is None else renormalize)
    return read


def _sigmoid_group(router):
    import torch

    return dict(scoring="sigmoid_group", renormalize=bool(router.norm_topk_prob), n_group=int(router.num_group),
                topk_group=int(router.topk_group), routed_scaling_factor=float(router.routed_scaling_factor),
                correction_bias=True, router_dtype=torch.float32)


ROUTERS: Tuple[RouterImpl, ...] = (
    # softmax (float32) -> top-k -> renormalise iff norm_topk_prob (Qwen2/3-MoE, OLMoE, ...).
    RouterImpl("softmax", "qwen3_moe", "Qwen3MoeTopKRouter", read=_softmax(None)),
    # The same, always renormalising (Mixtral; Qwen3-VL and Qwen3.5) or never (Jamba).
    RouterImpl("softmax_renormalized", "mixtral", "MixtralTopKRouter", read=_softmax(True)),
    RouterImpl("softmax_renormalized", "qwen3_vl_moe", "Qwen3VLMoeTextTopKRouter", read=_softmax(True)),
    RouterImpl("softmax_plain", "jamba", "JambaTopKRouter", read=_softmax(False)),
    # DeepSeek-V3: float32 sigmoid + correction bias, group-limited top-k, scaling.
    RouterImpl("sigmoid_group", "deepseek_v3", "DeepseekV3TopkRouter", read=_sigmoid_group,
               names={"router_weight": "weight", "correction_bias": "e_score_correction_bias"}),
    # GPT-OSS: top-k of the biased logits, softmax over the k.
    RouterImpl("topk_softmax", "gpt_oss", "GptOssTopKRouter", read=lambda router: dict(scoring="topk_softmax",
                                                                                      router_bias=True),
               names={"router_weight": "weight", "router_bias": "bias"}),
)

# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockImpl:
    """A block forward of a structure tpmoe.MoEBlock reproduces.

    experts: the experts module's attribute, or None where the block holds the expert weights
    itself (JetMoE); router: the router's attribute; router_input_flat: the forward hands it the [T, H] rows (else
    the block's input as it came); router_args: block attributes the forward passes to it after
    the hidden states; shared / shared_gate: the shared-expert MLP and its sigmoid gate Linear(H, 1);
    shared_optional: the forward skips a shared expert that is None; routed_scale: the block
    attribute the routed output is multiplied by; post_norm: a norm applied to the sum;
    jitter: Mixtral's router jitter on the input in training; router_output: what the router
    returns ("logits_weights_ids", or Llama-4's "scores_logits": [T, E] scores, zero off the top-k,
    and the logits; JetMoE's "dispatch": the pair order sorted by expert, the gates in that
    order, the per-expert counts and the logits); weights_on_input: the routing weights scale the
    experts' inputs (Llama-4); output_bias: a block parameter added to the output once (JetMoE);
    returns: "output", "output_and_weights" (GPT-OSS) or "output_and_logits" (Llama-4)."""

    name: str
    family: str
    class_name: str
    router: str = "gate"
    experts: Optional[str] = "experts"
    router_input_flat: bool = True
    router_args: Tuple[str, ...] = ()
    shared: Optional[str] = None
    shared_gate: Optional[str] = None
    shared_optional: bool = False
    routed_scale: Optional[str] = None
    post_norm: Optional[str] = None
    jitter: bool = False
    router_output: str = "logits_weights_ids"
    weights_on_input: bool = False
    output_bias: Optional[str] = None
    returns: str = "output"


BLOCKS: Tuple[BlockImpl, ...] = (
    BlockImpl("qwen3_moe", "qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    BlockImpl("olmoe", "olmoe", "OlmoeSparseMoeBlock"),
    BlockImpl("jamba", "jamba", "JambaSparseMoeBlock", router="router"),
    BlockImpl("mixtral", "mixtral", "MixtralSparseMoeBlock", jitter=True),
    BlockImpl("gpt_oss", "gpt_oss", "GptOssMLP", router="router", returns="output_and_weights"),
    BlockImpl("qwen2_moe", "qwen2_moe", "Qwen2MoeSparseMoeBlock", shared="shared_expert",
              shared_gate="shared_expert_gate"),
    BlockImpl("deepseek_v3", "deepseek_v3", "DeepseekV3MoE", router_input_flat=False, shared="shared_experts"),
    BlockImpl("flint", "flint", "FlintSparseMoeBlock", shared="shared_expert"),
    BlockImpl("laguna", "laguna", "LagunaSparseMoeBlock", shared="shared_experts", routed_scale="routed_scaling_factor"),
    BlockImpl("axk1", "axk1", "AXK1MoE", router_input_flat=False, shared="shared_experts",
              post_norm="post_mlp_layernorm"),
    BlockImpl("afmoe", "afmoe", "AfmoeSparseMoeBlock", router="router", router_input_flat=False,
              router_args=("expert_bias",),
              shared="shared_experts"),
    BlockImpl("aria", "aria", "AriaTextMoELayer", router="router", shared="shared_experts"),
    BlockImpl("hunyuan_v1_moe", "hunyuan_v1_moe", "HunYuanMoEV1Moe", shared="shared_mlp"),
    # Its enable_moe_fp32_combine adds the two bf16 outputs in float32 and rounds once, as a plain
    # bf16 add does: the same sum either way.
    BlockImpl("hy_v3", "hy_v3", "HYV3MoE", router_args=("e_score_correction_bias",), shared="shared_experts"),
    # Llama-4: y = shared(x) + sum_k E_k(sigmoid(l_k) x) over the top-k logits l_k.
    BlockImpl("llama4", "llama4", "Llama4TextMoe", router="router", router_output="scores_logits",
              shared="shared_expert", weights_on_input=True, returns="output_and_logits"),
    # JetMoE: top-k of the float32 logits, softmax over the k; one output bias for the block.
    BlockImpl("jetmoe", "jetmoe", "JetMoeMoE", router="router", experts=None, router_output="dispatch",
              output_bias="bias"),
    BlockImpl("ernie4_5_moe", "ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", shared="shared_experts",
              shared_optional=True),
)

# --------------------------------------------------------------------------- config classes


@dataclass(frozen=True)
class ConfigImpl:
    """A family's transformers config class and how a tpmoe.MoEConfig is written into it, to build
    the family's own block (its BLOCKS entry) at tpmoe's sizes: `tpmoe bench`'s HF implementations,
    the presets' check and the tests' reference blocks (tpmoe/hf/configs.py).

    fields: config field -> the MoEConfig field it holds; activation: the config field naming
    the activation by its ACT2FN name (ACT2FN_NAMES), or None where the family fixes it;
    shared_experts: the config field counting the shared expert in whole experts (DeepSeek-V3).
    What a family fixes (Mixtral always renormalises, Qwen2-MoE gates its shared expert,
    GPT-OSS's layout) is no field: it is read off the block built (weight_map.moe_config_of),
    as for every block `apply` meets."""

    family: str
    class_name: str
    fields: Dict[str, str]
    activation: Optional[str] = "hidden_act"
    shared_experts: Optional[str] = None


def _fields(intermediate: str, experts: str, **more: str) -> Dict[str, str]:
    """The sizes every family has, under its own names, and `more` (config field -> MoEConfig field)."""
    return {"hidden_size": "hidden_size", intermediate: "intermediate_size", experts: "num_experts",
            "num_experts_per_tok": "top_k", **more}


CONFIGS: Tuple[ConfigImpl, ...] = (
    ConfigImpl("qwen3_moe", "Qwen3MoeConfig", _fields("moe_intermediate_size", "num_experts",
                                                      norm_topk_prob="renormalize")),
    ConfigImpl("qwen2_moe", "Qwen2MoeConfig", _fields("moe_intermediate_size", "num_experts",
                                                      norm_topk_prob="renormalize",
                                                      shared_expert_intermediate_size="shared_intermediate_size")),
    ConfigImpl("mixtral", "MixtralConfig", _fields("intermediate_size", "num_local_experts")),
    ConfigImpl("olmoe", "OlmoeConfig", _fields("intermediate_size", "num_experts", norm_topk_prob="renormalize")),
    ConfigImpl("gpt_oss", "GptOssConfig", _fields("intermediate_size", "num_local_experts", swiglu_alpha="swiglu_alpha",
                                                  swiglu_limit="swiglu_limit"), activation=None),
    ConfigImpl("deepseek_v3", "DeepseekV3Config",
               _fields("moe_intermediate_size", "n_routed_experts", n_group="n_group", topk_group="topk_group",
                       routed_scaling_factor="routed_scaling_factor", norm_topk_prob="renormalize"),
               shared_experts="n_shared_experts"),
)

# tpmoe activation -> the ACT2FN name a config's hidden_act selects it by.
ACT2FN_NAMES: Dict[str, str] = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}

# --------------------------------------------------------------------------- refused on sight

# Families whose block is no routed-experts block in tpmoe's sense, with the reason a user reads.
NOT_EXPERT_BLOCKS: Dict[str, str] = {
    "switch_transformers.SwitchTransformersSparseMLP":
        "capacity-limited top-1 routing: tokens past an expert's capacity are dropped, per-expert modules with "
        "dropout; tpmoe computes every routed token (dropless)",
    "nllb_moe.NllbMoeSparseMLP":
        "capacity-limited top-2 routing with random second-expert sampling: tokens past capacity are dropped; "
        "tpmoe computes every routed token (dropless)",
}

# Experts modules whose loop tpmoe knows and does not run, with the reason a user reads.
REFUSED_EXPERTS: Dict[str, str] = {
    "ergo.ErgoExperts":
        "each route's output goes through its expert's own RMSNorm (ErgoExpertNorm, one weight per expert) "
        "before the weighted sum; tpmoe's post-expert norm is one module shared by every expert (Muse-Spark's). "
        "Run this family with transformers' own experts",
}
