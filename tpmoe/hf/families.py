"""Which Hugging Face MoE blocks tpmoe can run, read from the installed transformers.

A family is supported when its MoE block computes exactly what one of the verified reference
blocks computes. That is decided from the installed transformers itself, not from a list of
names: the `forward` methods of the block, of its router and of its experts (the experts' own
eager loop, unwrapped from `@use_experts_implementation`), and of the shared expert's MLP when
there is one, are parsed, stripped of docstrings and comments (`ast.unparse`), and compared
with the same methods of the reference family. Equal code on equal parameter names is the same
computation, so a family that transformers generates from a reference with `modular_*.py`
(most of them) is supported, and one whose router or block differs in a single line is not.

Reference patterns (the tpmoe.MoEConfig each maps to):

  mixtral      MixtralSparseMoeBlock: softmax(fp32) -> top-k -> renormalise; router jitter in
               training (x *= U(1-j, 1+j), fed to router AND experts; see module.py for how
               tpmoe keeps it identical on every TP rank).
  qwen3_moe    Qwen3MoeSparseMoeBlock: softmax -> top-k -> renormalise iff norm_topk_prob.
               Same code as OlmoeSparseMoeBlock (olmoe), which therefore matches it.
  qwen2_moe    Qwen2MoeSparseMoeBlock: the qwen3_moe router + a shared expert MLP scaled by
               sigmoid(shared_expert_gate(x)).
  deepseek_v3  DeepseekV3MoE: fp32 router, sigmoid + e_score_correction_bias, group-limited
               top-k, renormalise iff norm_topk_prob, routed_scaling_factor; shared experts
               (ungated, added).
  gpt_oss      GptOssMLP: router with bias, top-k on logits -> softmax over the k; experts in
               GPT-OSS's transposed interleaved layout with biases and clamped swiglu; returns
               (hidden_states, router_scores).
  qwen3_vl_moe, qwen3_5_moe, jamba: the qwen3_moe / qwen2_moe / qwen3_moe blocks with a router
               that always (Qwen3-VL, Qwen3.5) or never (Jamba, router named `router`)
               renormalises, where the references read norm_topk_prob.

Families of the installed transformers (5.23.0): `python -m tpmoe.hf.families` imports every
models/*/modeling_*.py, finds the classes whose __init__ assigns self.experts and self.gate /
self.router, and judges them by the rule above. Its result is kept below as
SUPPORTED_FAMILIES_5_23 (27 blocks of 26 families: the six references and olmoe, the three
one-line router variants qwen3_vl_moe, qwen3_5_moe, jamba (patterns of their own below), plus
minimax, flex_olmo, mellum, qwen3_next, qwen4_exp, qwen3_omni_moe (thinker and talker text
models), deepseek_v32, glm4_moe, glm4_moe_lite, glm4v_moe, glm_moe_dsa, dots1, dots3_note
(text), exaone_moe, kimi_linear, bailing_hybrid, solar_open) and REJECTED_FAMILIES_5_23 (46
blocks, each with the reason). The recurring reasons for refusing:
  - a router tpmoe.routing does not implement: softmax with greedy / group-max top-k
    (deepseek_v2), softmax group-limited without correction bias (mistral4, mistral_large4),
    top-k on logits + bias then sigmoid (kolibri1), moe_statics-corrected choice with clamped
    renormalisation (ernie4_5_moe), sparsemixer (phimoe), top-k then softmax without bias
    (granitemoe*);
  - a block with terms tpmoe.MoEBlock has no slot for (zero/identity experts, input scaling,
    a shared MLP behind its own gate shape) or the experts applied to a scaled input (llama4);
  - experts that are not the fused 3-D layout (dbrx, nemotron_h, nllb_moe,
    switch_transformers: per-expert modules) or experts code that differs (post-expert norms).
A block that `apply` meets and cannot match raises UnsupportedFamilyError naming the family
(the models/<family> directory) and the module class, before anything is replaced.
"""
import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import MoEConfig


class UnsupportedFamilyError(TypeError):
    """An MoE block of a family (or a variant) that tpmoe does not run; names family and class."""


def require_transformers():
    """tpmoe.hf imports without transformers; the calls that need it say so here."""
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError("tpmoe.hf needs Hugging Face transformers: pip install -e .[hf] "
                          "(transformers>=5, accelerate)") from error


@dataclass(frozen=True)
class Pattern:
    """One verified reference block: where its code lives, and how its weights and config map."""

    name: str
    module: str            # transformers module holding the reference classes
    block_class: str
    router_attr: str       # attribute of the block holding the router ("gate" / "router")
    shared_attr: Optional[str] = None   # attribute of the shared expert MLP, if any
    shared_gate_attr: Optional[str] = None
    jitter: bool = False   # router_jitter_noise in training (Mixtral)
    # Renormalise the top-k weights: None reads the router's norm_topk_prob; True/False is fixed
    # by the router's code (Mixtral, Qwen3-VL/3.5 always; Jamba never).
    renormalize: Optional[bool] = None
    returns_router_scores: bool = False  # forward returns (hidden_states, router_scores) (GPT-OSS)


PATTERNS: Tuple[Pattern, ...] = (
    Pattern("mixtral", "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", "gate", jitter=True,
            renormalize=True),
    Pattern("qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate"),
    Pattern("olmoe", "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock", "gate"),
    Pattern("qwen2_moe", "transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate",
            shared_attr="shared_expert", shared_gate_attr="shared_expert_gate"),
    Pattern("deepseek_v3", "transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE", "gate",
            shared_attr="shared_experts"),
    Pattern("gpt_oss", "transformers.models.gpt_oss.modeling_gpt_oss", "GptOssMLP", "router",
            returns_router_scores=True),
    # One-line router variants of the above (block-level tests in tests/test_hf_apply.py):
    # qwen3_moe's block whose router always renormalises,
    Pattern("qwen3_vl_moe", "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock",
            "gate", renormalize=True),
    # qwen2_moe's block (shared expert + gate) whose router always renormalises,
    Pattern("qwen3_5_moe", "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", "gate",
            shared_attr="shared_expert", shared_gate_attr="shared_expert_gate", renormalize=True),
    # a plain block whose router (named `router`) never renormalises.
    Pattern("jamba", "transformers.models.jamba.modeling_jamba", "JambaSparseMoeBlock", "router", renormalize=False),
)

# What `python -m tpmoe.hf.families` found in transformers 5.23.0: "family.BlockClass" -> pattern.
# tests/test_hf_apply.py checks that the supported ones still match on the installed version.
SUPPORTED_FAMILIES_5_23: Dict[str, str] = {
    "bailing_hybrid.BailingHybridMoE": "deepseek_v3",
    "deepseek_v3.DeepseekV3MoE": "deepseek_v3",
    "deepseek_v32.DeepseekV32MoE": "deepseek_v3",
    "dots1.Dots1MoE": "deepseek_v3",
    "dots3_note.Dots3NoteTextMoE": "deepseek_v3",
    "exaone_moe.ExaoneMoeSparseMoEBlock": "deepseek_v3",
    "flex_olmo.FlexOlmoSparseMoeBlock": "olmoe",
    "glm4_moe.Glm4MoeMoE": "deepseek_v3",
    "glm4_moe_lite.Glm4MoeLiteMoE": "deepseek_v3",
    "glm4v_moe.Glm4vMoeTextMoE": "deepseek_v3",
    "glm_moe_dsa.GlmMoeDsaMoE": "deepseek_v3",
    "gpt_oss.GptOssMLP": "gpt_oss",
    "jamba.JambaSparseMoeBlock": "jamba",
    "kimi_linear.KimiLinearMoE": "deepseek_v3",
    "mellum.MellumSparseMoeBlock": "qwen3_moe",
    "minimax.MiniMaxSparseMoeBlock": "mixtral",
    "mixtral.MixtralSparseMoeBlock": "mixtral",
    "olmoe.OlmoeSparseMoeBlock": "olmoe",
    "qwen2_moe.Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "qwen3_moe.Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "qwen3_5_moe.Qwen3_5MoeSparseMoeBlock": "qwen3_5_moe",
    "qwen3_next.Qwen3NextSparseMoeBlock": "qwen2_moe",
    "qwen3_omni_moe.Qwen3OmniMoeTalkerTextSparseMoeBlock": "qwen2_moe",
    "qwen3_omni_moe.Qwen3OmniMoeThinkerTextSparseMoeBlock": "qwen3_moe",
    "qwen3_vl_moe.Qwen3VLMoeTextSparseMoeBlock": "qwen3_vl_moe",
    "qwen4_exp.Qwen4ExpTextSparseMoeBlock": "qwen2_moe",
    "solar_open.SolarOpenMoE": "deepseek_v3",
}
# "family.BlockClass" -> why it is refused.
REJECTED_FAMILIES_5_23: Dict[str, str] = {
    "afmoe.AfmoeSparseMoeBlock": "code of the block, router matches no verified pattern",
    "aria.AriaTextMoELayer": "code of the block, router, experts matches no verified pattern",
    "axk1.AXK1MoE": "code of the block matches no verified pattern",
    "axk2.AXK2MoE": "code of the router matches no verified pattern",
    "beam.BeamMoE": "code of the block, router, experts matches no verified pattern",
    "cohere2_moe.Cohere2MoeSparseMoeBlock": "code of the block, router matches no verified pattern",
    "dbrx.DbrxFFN": "experts are per-expert modules, not the fused 3-D layout",
    "deepseek_ocr2.DeepseekOcr2TextMoe": "code of the router matches no verified pattern",
    "deepseek_v2.DeepseekV2Moe":
        "softmax router with greedy / group-limited-greedy (group max) top-k: not in tpmoe.routing",
    "deepseek_v4.DeepseekV4SparseMoeBlock": "router built by a helper (hash / sqrt-softplus scoring)",
    "diffusion_gemma.DiffusionGemmaDecoderTextLayer": "code of the block, router matches no verified pattern",
    "diffusion_gemma.DiffusionGemmaEncoderTextLayer": "code of the block, router matches no verified pattern",
    "dots3_note.Dots3NoteVisionMoE": "code of the block, router matches no verified pattern",
    "ernie4_5_moe.Ernie4_5_MoeSparseMoeBlock":
        "softmax + moe_statics correction for the choice, clamp(min=norm_min) renormalisation",
    "ernie4_5_vl_moe.Ernie4_5_VLMoeSparseMoeBlock": "Ernie 4.5's router, plus modality-split experts",
    "flint.FlintSparseMoeBlock": "code of the block, router matches no verified pattern",
    "gemma4.Gemma4TextDecoderLayer": "code of the block, router matches no verified pattern",
    "glm5_next.Glm5NextTextMoE": "code of the experts matches no verified pattern",
    "granitemoe.GraniteMoeMoE":
        "top-k on fp32 logits then softmax, no router bias, own block code (input_linear/output_linear)",
    "granitemoe_swa.GraniteMoeSWAMoE": "GraniteMoe's router and block",
    "granitemoehybrid.GraniteMoeHybridMoE": "GraniteMoe's router and block",
    "granitemoeshared.GraniteMoeSharedMoE": "GraniteMoe's router and block (+ shared MLP)",
    "hunyuan_v1_moe.HunYuanMoEV1Moe": "router is a Linear `wg` with a dtype switch, block adds a shared MLP: own code",
    "hy_v3.HYV3MoE": "code of the block, router matches no verified pattern",
    "hy_v4.HYV4MoE": "code of the experts matches no verified pattern",
    "inkling.InklingMoE": "code of the block, router matches no verified pattern",
    "inkling2.Inkling2SparseMoeBlock": "code of the router, experts matches no verified pattern",
    "kolibri1.Kolibri1SparseMoeBlock":
        "top-k on logits + correction bias, sigmoid of the chosen logits: not in tpmoe.routing",
    "laguna.LagunaSparseMoeBlock": "code of the block, router matches no verified pattern",
    "lfm2_moe.Lfm2MoeSparseMoeBlock": "code of the block, router matches no verified pattern",
    "llama4.Llama4TextMoe": "sigmoid of top-k logits applied to the expert INPUT, shared expert: not tpmoe's block",
    "longcat_flash.LongcatFlashMoE": "code of the block, router, experts matches no verified pattern",
    "mimo_v2_flash.MiMoV2FlashMoE": "code of the block matches no verified pattern",
    "minimax_m2.MiniMaxM2SparseMoeBlock": "code of the block, router matches no verified pattern",
    "minimax_m3_vl.MiniMaxM3VLSparseMoeBlock": "code of the block, router, experts matches no verified pattern",
    "mistral4.Mistral4MoE": "softmax (not sigmoid) group-limited routing without correction bias: not in tpmoe.routing",
    "mistral_large4.MistralLarge4TextMoE": "softmax group-limited routing (Mistral-4 style): not in tpmoe.routing",
    "muse_spark.MuseSparkMoE": "code of the block, router, experts matches no verified pattern",
    "nemotron_h.NemotronHMoE": "non-gated relu^2 experts in per-expert modules",
    "nllb_moe.NllbMoeSparseMLP": "encoder-decoder top-2 gating with capacity, per-expert modules",
    "openai_privacy_filter.OpenAIPrivacyFilterMLP": "code of the block, router, experts matches no verified pattern",
    "phimoe.PhimoeSparseMoeBlock": "sparsemixer routing (jittered, two-stage), input jitter inside the router",
    "step3p7.Step3p7SparseMoeBlock": "code of the block, router, experts matches no verified pattern",
    "switch_transformers.SwitchTransformersSparseMLP": "top-1 gating with capacity and jitter, per-expert modules",
    "unlimited_ocr.UnlimitedOcrTextMoe": "code of the router matches no verified pattern",
    "zaya.ZayaSparseMoeBlock": "code of the block, router matches no verified pattern",
}


def _family_of(cls: type) -> str:
    """'qwen3_moe' for transformers.models.qwen3_moe.modeling_qwen3_moe.X; the module path otherwise."""
    parts = cls.__module__.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models":
        return parts[2]
    return cls.__module__


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node

    visit_FunctionDef = _strip
    visit_ClassDef = _strip


@functools.lru_cache(maxsize=None)
def _normalized_code(function: Callable) -> Optional[str]:
    """The function's code without docstrings, comments, decorators or formatting; None if unreadable."""
    function = inspect.unwrap(function)
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    tree = _StripDocstrings().visit(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            node.decorator_list = []
    return ast.unparse(tree)


def _forward_code(module_or_class) -> Optional[str]:
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    forward = cls.__dict__.get("forward")
    if forward is None:  # inherited: compare the code it inherits
        forward = getattr(cls, "forward", None)
    return None if forward is None else _normalized_code(forward)


def _experts_code(experts_class: type) -> Tuple[Optional[str], Optional[str]]:
    """(eager forward code, _apply_gate code) of an experts class."""
    gate = experts_class.__dict__.get("_apply_gate")
    return _forward_code(experts_class), (None if gate is None else _normalized_code(gate))


@functools.lru_cache(maxsize=None)
def _reference_signature(pattern: Pattern):
    """The code of the reference family's block, router, experts (and shared MLP) forwards."""
    import importlib

    module = importlib.import_module(pattern.module)
    block_class = getattr(module, pattern.block_class)
    init_source = inspect.getsource(block_class.__init__)
    router_class = _attribute_class(module, init_source, pattern.router_attr)
    experts_class = _attribute_class(module, init_source, "experts")
    shared_class = _attribute_class(module, init_source, pattern.shared_attr) if pattern.shared_attr else None
    return (_forward_code(block_class), _forward_code(router_class), _experts_code(experts_class),
            _forward_code(shared_class) if shared_class else None)


def _attribute_class(module, init_source: str, attribute: str) -> type:
    """The class assigned to self.<attribute> in the reference __init__ (e.g. self.gate = XRouter(config))."""
    tree = ast.parse(textwrap.dedent(init_source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == attribute for t in node.targets):
            call = node.value
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
                return getattr(module, call.func.id)
    raise LookupError(f"{module.__name__}: no `self.{attribute} = Class(...)` in the reference block's __init__")


def is_moe_block(module: nn.Module) -> bool:
    """A module holding routed experts next to a router: what `apply` must either swap or refuse.

    The experts of every family with the fused layout carry `gate_up_proj`/`up_proj` and
    `down_proj` 3-D parameters; older layouts hold an nn.ModuleList of expert MLPs. Either way
    the block is the parent of the `experts` child that also owns a router-like child.
    """
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return False
    return any(isinstance(getattr(module, name, None), nn.Module) for name in ("gate", "router"))


def _signature_of(module: nn.Module, pattern: Pattern):
    router = getattr(module, pattern.router_attr, None)
    experts = getattr(module, "experts", None)
    if router is None or experts is None:
        return None
    shared = getattr(module, pattern.shared_attr, None) if pattern.shared_attr else None
    if pattern.shared_attr and shared is None:
        return None
    return (_forward_code(module), _forward_code(router), _experts_code(type(experts)),
            _forward_code(shared) if shared is not None else None)


def match_pattern(module: nn.Module) -> Optional[Pattern]:
    """The reference pattern whose code this block's code equals, or None."""
    for pattern in PATTERNS:
        signature = _signature_of(module, pattern)
        if signature is not None and None not in signature[:2] and signature == _reference_signature(pattern):
            return pattern
    return None


def unsupported_error(module: nn.Module, name: str) -> UnsupportedFamilyError:
    cls = type(module)
    return UnsupportedFamilyError(
        f"model: the MoE block {name or '<root>'} is {cls.__module__}.{cls.__qualname__} of the family "
        f"{_family_of(cls)!r}, which tpmoe does not support: its block, router or experts code differs from "
        f"every verified pattern ({', '.join(p.name for p in PATTERNS)}); see tpmoe/hf/families.py")


# --------------------------------------------------------------------------- config + weights

# transformers activation module classes -> tpmoe activation names (compared by class name, so
# that transformers is not imported here).
_ACTIVATIONS = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                "ReLU": "relu"}


def _activation_of(act_fn, where: str) -> str:
    name = type(act_fn).__name__
    if name not in _ACTIVATIONS:
        raise UnsupportedFamilyError(f"{where}: activation {type(act_fn).__module__}.{name} has no tpmoe "
                                     f"counterpart (supported: {sorted(set(_ACTIVATIONS.values()))})")
    # The python variants (use_gelu_python=True...) compute the same function, only slower.
    return _ACTIVATIONS[name]


def hf_weight_names(pattern: Pattern) -> Dict[str, List[str]]:
    """tpmoe weight name -> the block's HF parameter/buffer names (concatenated along dim 0)."""
    router = pattern.router_attr
    names = {"router_weight": [f"{router}.weight"], "w_gate_up": ["experts.gate_up_proj"],
             "w_down": ["experts.down_proj"]}
    if pattern.name == "gpt_oss":
        names.update(router_bias=[f"{router}.bias"], b_gate_up=["experts.gate_up_proj_bias"],
                     b_down=["experts.down_proj_bias"])
    if pattern.name == "deepseek_v3":
        names["correction_bias"] = [f"{router}.e_score_correction_bias"]
    if pattern.shared_attr:
        shared = pattern.shared_attr
        names.update(shared_gate_up=[f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"],
                     shared_down=[f"{shared}.down_proj.weight"])
    if pattern.shared_gate_attr:
        names["shared_gate"] = [f"{pattern.shared_gate_attr}.weight"]
    return names


def moe_config_of(module: nn.Module, pattern: Pattern, name: str) -> MoEConfig:
    """The tpmoe.MoEConfig of a matched block, read from the module's own attributes and shapes
    (full shapes: DTensor parameters report their global shape)."""
    router = getattr(module, pattern.router_attr)
    experts = module.experts
    where = f"model: {name} ({type(module).__name__})"
    if pattern.name == "gpt_oss":
        num_experts, hidden, gate_up_rows = experts.gate_up_proj.shape
        return MoEConfig(hidden_size=hidden, intermediate_size=gate_up_rows // 2, num_experts=num_experts,
                         top_k=router.top_k, scoring="topk_softmax", router_bias=True, activation="clamped_swiglu",
                         layout="gpt_oss", expert_bias=True, swiglu_alpha=float(experts.alpha),
                         swiglu_limit=float(experts.limit))
    num_experts, gate_up_rows, hidden = experts.gate_up_proj.shape
    activation = _activation_of(experts.act_fn, where)
    common = dict(hidden_size=hidden, intermediate_size=gate_up_rows // 2, num_experts=num_experts,
                  top_k=router.top_k, activation=activation)
    shared_size = 0
    if pattern.shared_attr:
        shared = getattr(module, pattern.shared_attr)
        if _activation_of(shared.act_fn, where + " shared expert") != activation:
            raise UnsupportedFamilyError(f"{where}: the shared expert's activation differs from the routed experts'; "
                                         f"tpmoe.MoEBlock runs both with one activation")
        shared_size = shared.gate_proj.weight.shape[0]
        # tpmoe's shared expert has no biases and a [1, H] gate: refuse a variant that adds them.
        biased = [f"{pattern.shared_attr}.{proj}" for proj in ("gate_proj", "up_proj", "down_proj")
                  if getattr(getattr(shared, proj), "bias", None) is not None]
        if pattern.shared_gate_attr:
            shared_gate = getattr(module, pattern.shared_gate_attr)
            if getattr(shared_gate, "bias", None) is not None:
                biased.append(pattern.shared_gate_attr)
            if tuple(shared_gate.weight.shape) != (1, hidden):
                raise UnsupportedFamilyError(f"{where}: {pattern.shared_gate_attr} has shape "
                                             f"{tuple(shared_gate.weight.shape)}, tpmoe's shared gate is (1, {hidden})")
        if biased:
            raise UnsupportedFamilyError(f"{where}: {biased} carry biases, which tpmoe's shared expert does not have")
    if pattern.name == "deepseek_v3":
        return MoEConfig(scoring="sigmoid_group", renormalize=bool(router.norm_topk_prob), n_group=router.num_group,
                         topk_group=router.topk_group, routed_scaling_factor=float(router.routed_scaling_factor),
                         correction_bias=True, router_dtype=torch.float32, shared_intermediate_size=shared_size,
                         **common)
    renormalize = pattern.renormalize if pattern.renormalize is not None else bool(router.norm_topk_prob)
    return MoEConfig(renormalize=renormalize, shared_intermediate_size=shared_size,
                     shared_expert_gate=pattern.shared_gate_attr is not None, **common)


def hf_tensors_of(module: nn.Module, pattern: Pattern) -> Dict[str, List[torch.Tensor]]:
    """tpmoe weight name -> the block's HF tensors (parameters or DTensors, not copied)."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {name: [tensors[hf_name] for hf_name in hf_names] for name, hf_names in hf_weight_names(pattern).items()}


# --------------------------------------------------------------------------- scan

def scan_installed_families() -> Tuple[Dict[str, str], Dict[str, str]]:
    """Imports every transformers.models.*.modeling_* module and sorts the MoE block classes in it.

    Returns ({family: pattern}, {family: reason}). Classes are judged by code alone (no
    instance is built): a class whose __init__ assigns self.experts and self.gate/self.router
    is an MoE block; it is supported when its forward, its router's, its experts' (and its
    shared MLP's) equal a reference pattern's. Slow (imports ~400 modules): for the docs, not
    for `apply`, which judges the instances it meets.
    """
    import importlib
    import pkgutil

    import transformers.models as models

    supported, rejected = {}, {}
    for info in pkgutil.iter_modules(models.__path__):
        family = info.name
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue  # no modeling file, or it needs an optional dependency
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, nn.Module):
                continue
            verdict = _judge_class(module, cls)
            if verdict is None:
                continue
            matched, text = verdict
            key = f"{family}.{cls.__name__}"
            (supported if matched else rejected)[key] = text
    return supported, rejected


def _judge_class(module, cls) -> Optional[Tuple[bool, str]]:
    try:
        init_source = inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return None
    if "self.experts =" not in init_source:
        return None
    router_attr = "router" if "self.router =" in init_source else "gate" if "self.gate =" in init_source else None
    if router_attr is None:
        return None
    try:
        experts_class = _attribute_class(module, init_source, "experts")
        router_class = _attribute_class(module, init_source, router_attr)
    except LookupError:
        return False, "experts or router built by a helper, not a class call: not a known layout"
    if not hasattr(experts_class, "has_gate") and "gate_up_proj" not in inspect.getsource(experts_class):
        return False, f"experts {experts_class.__name__} are not the fused 3-D layout (per-expert modules)"
    signature_block = _forward_code(cls)
    signature_router = _forward_code(router_class)
    signature_experts = _experts_code(experts_class)
    for pattern in PATTERNS:
        if pattern.router_attr != router_attr:
            continue
        block, router, experts, shared = _reference_signature(pattern)
        if (signature_block, signature_router, signature_experts) != (block, router, experts):
            continue
        if pattern.shared_attr:
            try:
                shared_class = _attribute_class(module, init_source, pattern.shared_attr)
            except LookupError:
                continue
            if _forward_code(shared_class) != shared:
                continue
        return True, pattern.name
    parts = {"block": signature_block, "router": signature_router, "experts": signature_experts}
    differs = [part for index, (part, code) in enumerate(parts.items())
               if code not in {_reference_signature(p)[index] for p in PATTERNS}]
    if differs:
        return False, "code of the " + ", ".join(differs) + " matches no verified pattern"
    return False, "block, router and experts each match a pattern, but not the same one"


if __name__ == "__main__":  # python -m tpmoe.hf.families: the scan behind the lists above
    found, refused = scan_installed_families()
    print("supported:")
    for key, value in sorted(found.items()):
        print(f"  {key}: {value}")
    print("rejected:")
    for key, value in sorted(refused.items()):
        print(f"  {key}: {value}")
