"""Real MoE layer shapes by name, for `tpmoe verify` / `tpmoe bench` and for users' own runs.

    config = preset_config("qwen3-30b-a3b", scale=1 / 16)   # hidden and intermediate sizes / 16

Each preset is one MoE block of a released checkpoint, described as a tpmoe.MoEConfig. The
sizes come from the checkpoint's config.json; tests/hf/test_presets.py checks them against the
family's transformers config class (tpmoe/hf/registry.py CONFIGS), whose defaults describe the
same model except where `hf_overrides` says otherwise (e.g. Qwen3-MoE's class keeps
norm_topk_prob=False while the Qwen3-30B-A3B checkpoint sets it True).

`scale` shrinks the hidden and intermediate sizes (never the expert count or top-k, which
fix the routing pattern) for machines that cannot hold the real block.
"""
from dataclasses import dataclass, field, replace
from typing import Dict

import torch

from .config import MoEConfig

# Scaled sizes stay multiples of this: GEMM tiles and TP shards stay sane, and no size reaches 0.
SCALE_MULTIPLE = 8


@dataclass(frozen=True)
class Preset:
    name: str
    model: str                   # the checkpoint it describes (Hugging Face id)
    family: str                  # transformers model type whose MoE block it is (registry CONFIGS)
    config: MoEConfig
    # Arguments to the family's transformers config class that turn its defaults into this
    # checkpoint (where the class defaults describe another size or another variant).
    hf_overrides: Dict[str, object] = field(default_factory=dict)


_PRESET_LIST = (
    Preset("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", "mixtral",
           MoEConfig(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2, renormalize=True)),
    Preset("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "qwen3_moe",
           MoEConfig(hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8, renormalize=True),
           hf_overrides={"norm_topk_prob": True}),
    Preset("qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", "qwen2_moe",
           MoEConfig(hidden_size=2048, intermediate_size=1408, num_experts=60, top_k=4, renormalize=False,
                     shared_intermediate_size=5632, shared_expert_gate=True)),
    Preset("deepseek-v3", "deepseek-ai/DeepSeek-V3", "deepseek_v3",
           MoEConfig(hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=8, scoring="sigmoid_group",
                     renormalize=True, n_group=8, topk_group=4, routed_scaling_factor=2.5, correction_bias=True,
                     router_dtype=torch.float32, shared_intermediate_size=2048)),
    Preset("gpt-oss-20b", "openai/gpt-oss-20b", "gpt_oss",
           MoEConfig(hidden_size=2880, intermediate_size=2880, num_experts=32, top_k=4, scoring="topk_softmax",
                     router_bias=True, activation="clamped_swiglu", layout="gpt_oss", expert_bias=True,
                     swiglu_alpha=1.702, swiglu_limit=7.0),
           hf_overrides={"num_local_experts": 32}),  # GptOssConfig() defaults are gpt-oss-120b's 128 experts
    Preset("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", "olmoe",
           MoEConfig(hidden_size=2048, intermediate_size=1024, num_experts=64, top_k=8, renormalize=False),
           hf_overrides={"intermediate_size": 1024}),  # OlmoeConfig() says 2048; the checkpoint has 1024
    # Not a released model: small enough for tests and demos, with a gated shared expert so that
    # every kind of sharded weight is exercised. Shaped like Qwen1.5-MoE.
    Preset("tiny", "(none: tests and demos)", "qwen2_moe",
           MoEConfig(hidden_size=32, intermediate_size=24, num_experts=8, top_k=2, shared_intermediate_size=16,
                     shared_expert_gate=True)),
)
PRESETS: Dict[str, Preset] = {preset.name: preset for preset in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def scale_size(size: int, scale: float) -> int:
    """size * scale rounded to a multiple of SCALE_MULTIPLE (at least one multiple); 0 stays 0."""
    if size == 0:
        return 0
    if scale == 1.0:
        return size
    return max(SCALE_MULTIPLE, round(size * scale / SCALE_MULTIPLE) * SCALE_MULTIPLE)


def scaled_config(config: MoEConfig, scale: float) -> MoEConfig:
    """The same block with hidden, intermediate and shared sizes times `scale` (0 < scale <= 1)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise ValueError(f"scale: expected a number in (0, 1], got {scale!r}")
    return replace(config, hidden_size=scale_size(config.hidden_size, scale),
                   intermediate_size=scale_size(config.intermediate_size, scale),
                   shared_intermediate_size=scale_size(config.shared_intermediate_size, scale))


def preset_config(name: str, scale: float = 1.0) -> MoEConfig:
    return scaled_config(get_preset(name).config, scale)


def describe_presets() -> str:
    """One line per preset: name, sizes, shared expert, layout, scoring (what --list-presets prints)."""
    header = ("name", "H", "I", "E", "K", "shared", "layout", "scoring", "activation", "model")
    rows = [header]
    for preset in PRESETS.values():
        c = preset.config
        shared = "-" if c.shared_intermediate_size == 0 else (
            f"{c.shared_intermediate_size}" + ("+gate" if c.shared_expert_gate else ""))
        scoring = c.scoring + (f" g{c.n_group}/{c.topk_group} x{c.routed_scaling_factor:g}"
                               if c.scoring == "sigmoid_group" else "")
        scoring += "+renorm" if c.renormalize else ""
        rows.append((preset.name, str(c.hidden_size), str(c.intermediate_size), str(c.num_experts), str(c.top_k),
                     shared, c.layout + ("+bias" if c.expert_bias else ""), scoring, c.activation, preset.model))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
