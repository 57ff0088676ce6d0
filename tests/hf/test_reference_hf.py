"""tpmoe.reference against transformers' own MoE blocks, same weights, float64.

Output, input gradient and every weight gradient (HF names mapped to tpmoe's by
tests/support/hf_models.py). Two comparisons per family:
- exact: HF's float32 router casts switched off (hf_router_float32_casts_disabled), so both
  sides compute the same math in float64: within 1e-10 of max |HF|.
- as shipped: HF untouched; its routers round to float32 even in a float64 model (Qwen,
  OLMoE, Mixtral), so the difference is that rounding: within FP32_RTOL. DeepSeek-V3 is
  described with router_dtype=float32, as HF computes it.
"""
import dataclasses

import pytest
import torch

from tpmoe.reference import reference_moe_block
from support.tolerances import FP32_RTOL, max_rel_error

try:
    import transformers  # noqa: F401
except ImportError:
    pytest.skip("transformers is not installed: nothing to compare against", allow_module_level=True)

from support.hf_models import (UNTRAINED, available_families, hf_block_forward, hf_router_float32_casts_disabled,
                               hf_to_tpmoe_weights, make_hf_block)

EXACT_RTOL = 1e-10
FAMILIES_PRESENT = available_families()

# (family, HF config arguments over hf_models' tiny defaults H=24, I=40, E=8, K=2): odd sizes,
# each router option once, clamping that really clamps.
CASES = [
    ("qwen3_moe", dict(num_experts=7, num_experts_per_tok=3, norm_topk_prob=True)),
    ("qwen3_moe", dict(num_experts=7, num_experts_per_tok=2, norm_topk_prob=False, hidden_act="gelu")),
    ("qwen3_moe", dict(hidden_act="gelu_pytorch_tanh")),
    ("qwen3_moe", dict(hidden_act="relu")),
    ("qwen2_moe", dict(num_experts_per_tok=3, shared_expert_intermediate_size=37)),
    ("mixtral", dict(num_local_experts=7)),
    ("olmoe", dict(num_experts=8, num_experts_per_tok=3)),
    # limit 0.8 so that gate and up values beyond +-limit occur (at 7.0 none would).
    ("gpt_oss", dict(num_local_experts=7, num_experts_per_tok=3, swiglu_limit=0.8, swiglu_alpha=1.3)),
    ("deepseek_v3", dict(n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)),
    ("deepseek_v3", dict(n_routed_experts=6, n_group=3, topk_group=1, num_experts_per_tok=2,
                         routed_scaling_factor=1.7, norm_topk_prob=False, n_shared_experts=2)),
]


def _case_id(case):
    family, kwargs = case
    return family + "-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def _run_both(family, config_kwargs, num_tokens, *, exact):
    hf_module, config, weights = make_hf_block(family, config_kwargs)
    if exact:
        # HF's router in float64 too (its float32 casts are off): describe it that way.
        config = dataclasses.replace(config, router_dtype=None)
    x = torch.randn(1, num_tokens, config.hidden_size, dtype=torch.float64)
    x_hf = x.clone().requires_grad_()
    x_ours = x.clone().requires_grad_()
    for name, tensor in weights.items():
        tensor.requires_grad_(name not in UNTRAINED)

    if exact:
        with hf_router_float32_casts_disabled():
            y_hf = hf_block_forward(hf_module, x_hf)
    else:
        y_hf = hf_block_forward(hf_module, x_hf)
    y_ours = reference_moe_block(x_ours, weights, config)
    grad_y = torch.randn_like(y_hf)
    (y_hf * grad_y).sum().backward()
    (y_ours * grad_y).sum().backward()

    pairs = {"output": (y_ours.detach(), y_hf.detach()), "grad hidden_states": (x_ours.grad, x_hf.grad)}
    hf_grads = hf_to_tpmoe_weights(hf_module, grad=True)
    trained = [name for name in weights if name not in UNTRAINED]
    assert sorted(hf_grads) == sorted(trained), f"weights {sorted(trained)} vs HF gradients {sorted(hf_grads)}"
    for name in trained:
        assert weights[name].grad is not None, f"reference gave no gradient for {name}"
        pairs[f"grad {name}"] = (weights[name].grad, hf_grads[name])
    for name in UNTRAINED:
        if name in weights:
            assert weights[name].grad is None, f"{name} is not trained, but the reference gave it a gradient"
    return pairs


def _check(pairs, rtol):
    for what, (ours, theirs) in pairs.items():
        assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs HF {tuple(theirs.shape)}"
        assert theirs.abs().max() > 0, f"{what}: HF's is all zeros, the comparison would prove nothing"
        error = max_rel_error(ours, theirs)
        assert error <= rtol, f"{what}: max relative error {error:.3e} > {rtol:.1e}"


def _present(case):
    family = case[0]
    return pytest.param(*case, id=_case_id(case), marks=pytest.mark.skipif(
        family not in FAMILIES_PRESENT, reason=f"this transformers has no {family} module"))


@pytest.mark.parametrize("num_tokens", [1, 13])
@pytest.mark.parametrize("family, config_kwargs", [_present(case) for case in CASES])
def test_reference_matches_hf_exact(family, config_kwargs, num_tokens, seed):
    _check(_run_both(family, config_kwargs, num_tokens, exact=True), EXACT_RTOL)


@pytest.mark.parametrize("family, config_kwargs", [_present(case) for case in CASES])
def test_reference_matches_hf_as_shipped(family, config_kwargs, seed):
    _check(_run_both(family, config_kwargs, 13, exact=False), FP32_RTOL)


@pytest.mark.skipif("qwen3_moe" not in FAMILIES_PRESENT, reason="this transformers has no qwen3_moe module")
def test_float32_casts_switch_is_not_vacuous(seed):
    """The exact comparison relies on switching HF's float32 router casts off: prove they were
    on (as shipped, HF differs from the float64 reference by float32 rounding, far above 1e-10)."""
    pairs = _run_both("qwen3_moe", dict(num_experts=7, num_experts_per_tok=3), 13, exact=True)
    hf_module, config, weights = make_hf_block("qwen3_moe", dict(num_experts=7, num_experts_per_tok=3))
    x = torch.randn(1, 13, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        shipped = hf_block_forward(hf_module, x)
        with hf_router_float32_casts_disabled():
            exact = hf_block_forward(hf_module, x)
    assert max_rel_error(shipped, exact) > 100 * EXACT_RTOL
    assert max_rel_error(shipped, exact) < FP32_RTOL
    _check(pairs, EXACT_RTOL)
