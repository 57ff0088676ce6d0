"""Every supported transformers MoE block, built tiny, and the comparison of one against tpmoe.

    block = make_family_block("qwen3_moe.Qwen3MoeSparseMoeBlock", seed)

builds the family's own block class from its config class (no download) with the tiny sizes
below, random weights (tests/support/hf_models.randomize_), in float32, inside a holder module (as
`holder.mlp`) so that tpmoe.hf.apply finds it as it would in a model. `run_block` runs it
forward and backward on fixed random inputs; `compare` checks a swapped copy against it: the
output, the input gradient and the gradient of every HF parameter (tpmoe's, mapped back to HF
names and, under TP, compared with this rank's slice).

Adding a family whose config needs more than the common tiny sizes is one line in
FAMILY_SIZES.
"""
import copy
import dataclasses
import inspect
from typing import Dict

import torch

from support.hf_models import PerBlockCollectives, randomize_
from tpmoe.hf.code import configuration_module, modeling_module, reference_class

HIDDEN = 24
# I = 10 is odd per rank at world size 2 (5, 5) and uneven at 3 (4, 3, 3); the shared expert's
# 14 is (7, 7) and (5, 5, 4).
COMMON_SIZES = dict(
    hidden_size=HIDDEN, intermediate_size=10, moe_intermediate_size=10, expert_ffn_hidden_size=10,
    num_experts=8, n_routed_experts=8, num_local_experts=8, moe_num_experts=8,
    num_experts_per_tok=2, moe_topk=2, top_k_experts=2, moe_k=2, moe_top_k=2,
    n_group=4, topk_group=2, n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1,
    shared_expert_intermediate_size=14, moe_shared_expert_intermediate_size=14, shared_intermediate_size=14,
    shared_experts_intermediate_size=14, dense_intermediate_size=14,
    num_attention_heads=4, num_key_value_heads=2, head_dim=6, num_hidden_layers=2, vocab_size=61,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# Per family (or "family.Class"): config fields beyond COMMON_SIZES (HF names; None drops a
# common one); "_block": extra arguments of the block's constructor.
FAMILY_SIZES: Dict[str, dict] = {
    "deepseek_v2": dict(topk_method="group_limited_greedy"),
    "deepseek_ocr2": dict(topk_method="group_limited_greedy"),
    "unlimited_ocr": dict(topk_method="group_limited_greedy"),
    "cohere2_moe": dict(shared_expert_combination_strategy="average"),
    "lfm2_moe": dict(use_expert_bias=True),
    # A wide sparse-mixer mask (several experts within 2 * jitter_eps of the best) and input jitter:
    # the router gets gradients, and training mode draws random numbers that matter.
    "phimoe": dict(router_jitter_noise=0.5, input_jitter_noise=0.1),
    "minimax_m2": dict(router_jitter_noise=0.1),
    "bailing_hybrid": dict(swiglu_limit=3.0),
    "step3p7": dict(swiglu_limits=[3.0, 3.0], _block=dict(layer_idx=0)),
    "deepseek_v4": dict(swiglu_limit=3.0, mlp_layer_types=["moe", "hash_moe"], _block=dict(layer_idx=0)),
    "glm5_next": dict(swiglu_limit=3.0, num_key_value_heads=4),
    "hy_v4": dict(swiglu_limit=3.0),
    "hy_v4_vl": dict(swiglu_limit=3.0),
    "dots3_note": dict(num_key_value_heads=4),
    "qwen3_omni_moe.Qwen3OmniMoeTalkerTextSparseMoeBlock": dict(shared_expert_intermediate_size=14),
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[10, 10], _block=dict(intermediate_size=10)),
    "longcat_flash": dict(zero_expert_num=3),
    "dbrx": dict(_config="DbrxConfig", d_model=HIDDEN, n_heads=4, n_layers=2, vocab_size=61,
                 ffn_config=dict(hidden_size=HIDDEN, ffn_hidden_size=10, moe_num_experts=8, moe_top_k=2)),
    "zaya": dict(num_experts_per_tok=1, _block=dict(layer_idx=1)),
    "dots3_note.Dots3NoteVisionMoE": dict(num_hidden_layers=None, adapter_in_dim=HIDDEN, _block=dict(layer_idx=25)),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=12),
    "gemma4": dict(enable_moe_block=True, hidden_size_per_layer_input=0, _block=dict(layer_idx=0)),
    "diffusion_gemma": dict(_block=dict(layer_idx=0)),
    # Kolibri checks its attention: NVFP4 key/value rounding needs head_dim a multiple of 16, the
    # indexer at most the query heads of one key head.
    "kolibri1_1": dict(head_dim=16, index_num_heads=2),
}


def _family_sizes(key: str) -> dict:
    family = key.split(".")[0]
    return {**FAMILY_SIZES.get(family, {}), **FAMILY_SIZES.get(key, {})}


def _config_class(block_class: type, key: str = ""):
    from transformers import PreTrainedConfig

    named = _family_sizes(key).get("_config") if key else None
    if named is not None:
        family = key.split(".")[0]
        return getattr(configuration_module(family), named)
    annotation = inspect.signature(block_class.__init__).parameters.get("config")
    annotation = annotation.annotation if annotation is not None else None
    if not (isinstance(annotation, type) and issubclass(annotation, PreTrainedConfig)):
        family = block_class.__module__.split(".")[2]
        module = configuration_module(family)
        candidates = [c for _, c in inspect.getmembers(module, inspect.isclass)
                      if issubclass(c, PreTrainedConfig) and c.__module__ == module.__name__]
        text = [c for c in candidates if c.__name__.endswith("TextConfig")]
        annotation = (text or candidates)[0]
    # A composite (vision-language) config: its blocks are built from the text config.
    return (getattr(annotation, "sub_configs", None) or {}).get("text_config", annotation)


def tiny_config(block_class: type, key: str):
    config_class = _config_class(block_class, key)
    names = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "attribute_map", {}))
    kwargs = {name: value for name, value in COMMON_SIZES.items() if name in names}
    kwargs.update({name: value for name, value in _family_sizes(key).items() if not name.startswith("_")})
    config = config_class(**{name: value for name, value in kwargs.items() if value is not None})
    config._experts_implementation = "eager"
    return config


def block_class_of(key: str) -> type:
    return reference_class(*key.split("."))


def make_family_block(key: str, seed: int) -> torch.nn.Module:
    """holder.mlp: the family's block with random weights (the same for a seed in every process)."""
    block_class = block_class_of(key)
    torch.manual_seed(seed)
    holder = torch.nn.Module()
    block_kwargs = dict(_family_sizes(key).get("_block", {}))
    # Blocks that take their layer index (bailing_hybrid from transformers 5.25) get layer 0 unless a
    # family's sizes name another.
    if "layer_idx" in inspect.signature(block_class.__init__).parameters:
        block_kwargs.setdefault("layer_idx", 0)
    holder.mlp = block_class(tiny_config(block_class, key), **block_kwargs)
    return randomize_(holder.float(), seed).eval()


def _output(value):
    return value[0] if isinstance(value, tuple) else value


def _layer_arguments(layer, tokens) -> dict:
    """What a decoder layer's forward needs besides the hidden states: rotary (cos, sin) of an
    identity rotation, no mask, and Gemma-4's shared key/value dict."""
    head_dim = layer.self_attn.head_dim
    arguments = dict(position_embeddings=(torch.ones(*tokens, head_dim), torch.zeros(*tokens, head_dim)),
                     attention_mask=None)
    if "shared_kv_states" in inspect.signature(layer.forward).parameters:
        arguments["shared_kv_states"] = {}
    return arguments


def run_block(holder, seed: int, tokens=(2, 5), key: str = ""):
    """(output, dx, {HF parameter name: grad}) of holder.mlp on random x and dy."""
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*tokens, HIDDEN, generator=generator).requires_grad_(True)
    holder.zero_grad(set_to_none=True)
    arguments = _layer_arguments(holder.mlp, tokens) if key in DECODER_LAYERS else {}
    # A copy of the leaf: blocks with jitter scale their input in place in training.
    y = _output(holder.mlp(x.clone(), **arguments))
    dy = torch.randn(y.shape, generator=generator)
    y.backward(dy)
    grads = {name: p.grad for name, p in holder.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def expected_local_grads(reference_holder, reference_grads, swapped_holder, rank: int, world_size: int, *,
                         ep_rank: int = 0, ep_size: int = 1):
    """{name: expected grad} for every trained parameter of the swapped holder, under its own names:
    kept HF parameters by name, tpmoe weights as this rank's slice of the HF gradients (its TP
    columns of, under expert parallelism, its EP rank's experts) in the block's stacked layout,
    to compare with local_grad of the parameter's gradient."""
    from tpmoe.hf.module import TpmoeHFBlock, TpmoeHFExperts
    from tpmoe.sharding import shard_weight
    from tpmoe.stacked import to_stacked

    expected = {}
    replacements = {name: m for name, m in swapped_holder.named_modules()
                    if isinstance(m, (TpmoeHFBlock, TpmoeHFExperts))}
    for name, parameter in swapped_holder.named_parameters():
        if not parameter.requires_grad:
            continue
        owner = next((o for o in replacements if name.startswith(o + ".block.")), None)
        if owner is None:
            expected[name] = reference_grads.get(name)
            continue
        replacement = replacements[owner]
        tp_name = name[len(owner) + len(".block."):]
        hf_names = [f"{owner}.{n}" for n in replacement.hf_weights.names[tp_name]]
        parts = [reference_grads.get(n) for n in hf_names]
        if any(part is None for part in parts):
            expected[name] = None
            continue
        whole = replacement.hf_weights.to_tpmoe(tp_name, parts)
        config = replacement.block.config
        expected[name] = to_stacked(config, tp_name, shard_weight(config, tp_name, whole, rank, world_size,
                                                                  ep_rank=ep_rank, ep_size=ep_size))
    return expected


def local_grad(grad):
    """A gradient as this rank holds it: a DTensor's local tensor (a parallel tpmoe block's
    parameters are DTensors), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor
    return grad.to_local() if isinstance(grad, DTensor) else grad


def compare(key: str, seed: int, group=None, rank: int = 0, world_size: int = 1, counter=None) -> dict:
    """Errors of the swapped block against transformers' own, plus its report and collectives."""
    import tpmoe.hf
    from support.tolerances import max_rel_error

    reference = make_family_block(key, seed)
    swapped = copy.deepcopy(reference)
    report = tpmoe.hf.apply(swapped, group)
    y_ref, dx_ref, grads_ref = run_block(reference, seed, key=key)
    per_block = PerBlockCollectives(counter, {"mlp": swapped.mlp}) if counter is not None else None
    y, dx, grads = run_block(swapped, seed, key=key)
    collectives = {}
    if per_block is not None:
        per_block.remove()
        collectives = dict(forward=per_block.forward["mlp"], backward=per_block.backward["mlp"])
    errors = {"output": max_rel_error(y, y_ref), "input grad": max_rel_error(dx, dx_ref)}
    missing, vacuous = [], []
    for name, expected in expected_local_grads(reference, grads_ref, swapped, rank, world_size).items():
        got = grads.get(name)
        got = None if got is None else local_grad(got)
        if expected is None or got is None:
            if (expected is None) != (got is None):
                missing.append(name)
            continue
        if expected.numel() and expected.abs().max() == 0:
            vacuous.append(name)
        errors[name] = max_rel_error(got, expected) if expected.numel() else 0.0
    state = tpmoe.hf.gather_state_dict(swapped)
    original = reference.state_dict()
    bitwise = sorted(state) == sorted(original) and all(torch.equal(state[n], t) for n, t in original.items())
    return dict(errors=errors, missing=missing, vacuous=vacuous, bitwise=bitwise, collectives=collectives,
                report=[(e.mode, e.pattern, e.router, e.shards, e.I_local, e.intermediate_size, e.source)
                        for e in report],
                compared=len(errors))


# The "blocks" that are whole decoder layers (their MoE part inside): run with layer arguments.
DECODER_LAYERS = ("gemma4.Gemma4TextDecoderLayer", "diffusion_gemma.DiffusionGemmaDecoderTextLayer",
                  "diffusion_gemma.DiffusionGemmaEncoderTextLayer")


def supported_keys() -> list:
    """The supported blocks of the snapshot (tpmoe/hf/families_snapshot.json)."""
    from tpmoe.hf.families import load_snapshot
    return sorted(load_snapshot()["supported"])


def installed(key: str) -> bool:
    """Whether the installed transformers has this block class. The snapshot is the pinned
    release's (tests/hf/test_hf_families.py checks that it is the installed one's judgement, so under
    the pin every key is installed); an older release of the tested range lacks the newer families."""
    try:
        block_class_of(key)
    except (ImportError, AttributeError):
        return False
    return True


# ---------------------------------------------------------------- tiny whole models

# Per family: the config fields a whole tiny CausalLM needs beyond COMMON_SIZES / FAMILY_SIZES
# (multi-head latent attention sizes, layer types without linear attention, ...).
_MLA = dict(kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=6, head_dim=4,
            num_key_value_heads=4)
MODEL_SIZES: Dict[str, dict] = {
    "deepseek_v3": dict(_MLA, first_k_dense_replace=1),
    "deepseek_v2": dict(_MLA),
    "glm4_moe_lite": dict(_MLA),
    "axk1": dict(_MLA),
    "axk2": dict(_MLA),
    "dots3_note": dict(num_key_value_heads=4),
    "deepseek_v32": dict(_MLA, index_topk=4, index_n_heads=2, index_head_dim=8, mlp_layer_types=["dense", "sparse"]),
    "glm_moe_dsa": dict(_MLA, index_topk=4, index_n_heads=2, index_head_dim=8, mlp_layer_types=["dense", "sparse"]),
    "beam": dict(mlp_layer_types=["sparse", "sparse"]),
    "flint": dict(mlp_only_layers=[]),
    "gemma4": dict(vocab_size_per_layer_input=61, hidden_size_per_layer_input=8, sliding_window=4),
    "diffusion_gemma": dict(sliding_window=4),
}


def causal_lm_class(config):
    """The family's *ForCausalLM class for a (text) config: transformers' auto map, else the
    modeling module's class of that name whose config_class is the config's."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        family = type(config).__module__.split(".")[2]
        module = modeling_module(family)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if name.endswith("ForCausalLM") and getattr(cls, "config_class", None) is type(config):
                return cls
    raise LookupError(f"no CausalLM class for {type(config).__name__}")


def causal_lm_config(family: str, **overrides):
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[family]
    config_class = (getattr(config_class, "sub_configs", None) or {}).get("text_config", config_class)
    names = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "attribute_map", {}))
    kwargs = {name: value for name, value in COMMON_SIZES.items() if name in names}
    kwargs.update({n: v for n, v in FAMILY_SIZES.get(family, {}).items() if not n.startswith("_")})
    kwargs.update(MODEL_SIZES.get(family, {}))
    kwargs.update(max_position_embeddings=64, tie_word_embeddings=False, use_cache=False)
    # None drops a tiny size; in overrides it is the value (DeepSeek-V3's q_lora_rank=None).
    config = config_class(**{**{name: value for name, value in kwargs.items() if value is not None}, **overrides})
    config._experts_implementation = "eager"
    return config


def make_family_causal_lm(family: str, seed: int, dtype: torch.dtype = torch.float32, **overrides):
    """(the family's tiny CausalLM with random weights, in `dtype`, eval mode); overrides: config fields."""
    config = causal_lm_config(family, **overrides)
    torch.manual_seed(seed)
    model = causal_lm_class(config)(config)
    return randomize_(model.to(dtype), seed).eval()
