"""tpmoe.presets: the real model shapes, checked against the transformers config classes.

Each preset must equal what tpmoe.hf reads off its family's block built from the config class
with the preset's `hf_overrides` (the checkpoint's values where the class defaults differ;
tpmoe.hf.configs.moe_config_from_hf, the adapter's own reading of a block).
Every override must really differ from the class default, so that the list documents exactly
where the defaults do not describe the checkpoint (and the rest of the preset comes from them).
"""
import dataclasses

import pytest

from tpmoe import MoEConfig
from tpmoe.presets import PRESETS, SCALE_MULTIPLE, describe_presets, get_preset, preset_config, scaled_config

RELEASED = [name for name in PRESETS if name != "tiny"]


def _config_class(family):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'tpmoe[hf]')")
    from tpmoe.hf.configs import config_class
    return config_class(family)


@pytest.mark.parametrize("name", RELEASED)
def test_preset_matches_transformers_config_class(name):
    preset = get_preset(name)
    config_class = _config_class(preset.family)
    from tpmoe.hf.configs import moe_config_from_hf

    defaults = config_class()
    for key, value in preset.hf_overrides.items():
        assert getattr(defaults, key) != value, f"{name}: override {key}={value!r} equals the class default"
    assert moe_config_from_hf(preset.family, config_class(**preset.hf_overrides)) == preset.config


def test_expected_checkpoint_overrides():
    """The differences between class defaults and checkpoints that the presets rely on."""
    assert get_preset("qwen3-30b-a3b").hf_overrides == {"norm_topk_prob": True}
    assert get_preset("gpt-oss-20b").hf_overrides == {"num_local_experts": 32}  # the class: gpt-oss-120b's 128
    assert get_preset("olmoe-1b-7b").hf_overrides == {"intermediate_size": 1024}
    for name in ("mixtral-8x7b", "qwen1.5-moe-a2.7b", "deepseek-v3"):
        assert get_preset(name).hf_overrides == {}, name


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("scale", [1.0, 1 / 16])
def test_bench_hf_mapping_round_trips(name, scale):
    """tpmoe.hf.configs describes each (scaled) preset to transformers without loss (what
    `tpmoe bench` builds its HF blocks from)."""
    preset = get_preset(name)
    config_class = _config_class(preset.family)
    from tpmoe.hf.configs import hf_config_kwargs, moe_config_from_hf

    config = preset_config(name, scale)
    assert moe_config_from_hf(preset.family, config_class(**hf_config_kwargs(preset.family, config))) == config


def test_real_shapes():
    deepseek = get_preset("deepseek-v3").config
    sizes = (deepseek.hidden_size, deepseek.intermediate_size, deepseek.num_experts, deepseek.top_k)
    assert sizes == (7168, 2048, 256, 8)
    assert (deepseek.shared_intermediate_size, deepseek.n_group, deepseek.topk_group) == (2048, 8, 4)
    assert deepseek.routed_scaling_factor == 2.5 and deepseek.scoring == "sigmoid_group"
    gpt_oss = get_preset("gpt-oss-20b").config
    assert (gpt_oss.hidden_size, gpt_oss.intermediate_size, gpt_oss.num_experts, gpt_oss.top_k) == (2880, 2880, 32, 4)
    assert gpt_oss.layout == "gpt_oss" and gpt_oss.expert_bias and gpt_oss.router_bias
    assert (gpt_oss.activation, gpt_oss.swiglu_alpha, gpt_oss.swiglu_limit) == ("clamped_swiglu", 1.702, 7.0)
    qwen2 = get_preset("qwen1.5-moe-a2.7b").config
    assert (qwen2.shared_intermediate_size, qwen2.shared_expert_gate) == (5632, True)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("scale", [1 / 3, 1 / 16, 1 / 1000])
def test_scaling_keeps_routing_and_alignment(name, scale):
    full = get_preset(name).config
    scaled = scaled_config(full, scale)
    for field in ("hidden_size", "intermediate_size"):
        value = getattr(scaled, field)
        assert value % SCALE_MULTIPLE == 0 and value >= SCALE_MULTIPLE, (field, value)
        assert value <= max(getattr(full, field), SCALE_MULTIPLE)
    assert scaled.shared_intermediate_size % SCALE_MULTIPLE == 0
    assert (scaled.shared_intermediate_size == 0) == (full.shared_intermediate_size == 0)
    unchanged = {f.name for f in dataclasses.fields(MoEConfig)} - {"hidden_size", "intermediate_size",
                                                                  "shared_intermediate_size"}
    assert all(getattr(scaled, f) == getattr(full, f) for f in unchanged)


def test_scale_one_is_the_real_shape():
    for name, preset in PRESETS.items():
        assert preset_config(name) == preset.config == scaled_config(preset.config, 1.0)


@pytest.mark.parametrize("scale", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_scale_names_the_argument(scale):
    with pytest.raises(ValueError, match=r"scale: expected a number in \(0, 1\]"):
        scaled_config(get_preset("tiny").config, scale)


def test_unknown_preset_lists_the_names():
    with pytest.raises(ValueError, match="preset: expected one of mixtral-8x7b, .*tiny, got 'mixtral'"):
        get_preset("mixtral")


def test_describe_lists_every_preset():
    text = describe_presets()
    lines = text.splitlines()
    assert lines[0].split()[:8] == ["name", "H", "I", "E", "K", "shared", "layout", "scoring"]
    assert [line.split()[0] for line in lines[1:]] == list(PRESETS)
    assert "5632+gate" in text and "gpt_oss+bias" in text and "sigmoid_group g8/4 x2.5+renorm" in text
