"""tpmoe.ExpertSpec and tpmoe.weights.ExpertWeights: what an expert computes and how its weights
are held, as one value each from the config to the backends (tpmoe.routed_experts).

routed_experts is checked against the float64 loop-style reference (output and every
gradient) on every CPU backend, and against tpmoe.fused_experts (its keywords' form) bitwise.
"""
import dataclasses

import pytest
import torch

import tpmoe
from tpmoe import ExpertSpec, ExpertWeights, MoEConfig, routed_experts
from tpmoe.reference import reference_experts

from support.experts_cases import CASES, GRAD_NAMES, case_id, case_inputs, case_options
from support.tolerances import assert_fp32_close

CPU_BACKENDS = ("cpu", "reference")


def _routed_with_grads(inputs, grad_out, spec, backend, dtype):
    leaves = {name: value.detach().to(dtype).clone().requires_grad_(True) for name, value in inputs.items()
              if name != "topk_ids"}
    weights = ExpertWeights(leaves["w_gate_up"], leaves["w_down"], leaves.get("b_gate_up"), leaves.get("b_down"))
    out = routed_experts(leaves["hidden_states"], weights, inputs["topk_ids"], leaves["topk_weights"], spec,
                         backend=backend)
    out.backward(grad_out.to(dtype))
    return out.detach(), {name: leaves[name].grad for name in GRAD_NAMES if name in leaves}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES[::3], ids=case_id)
def test_routed_experts_matches_float64_reference(case, backend, seed):
    inputs, grad_out = case_inputs(case, seed)
    spec = ExpertSpec(**case_options(case))
    out, grads = _routed_with_grads(inputs, grad_out, spec, backend, torch.float32)

    # The independent reference, in float64, with the keywords the spec unpacks to.
    leaves = {name: value.detach().double().clone().requires_grad_(True) for name, value in inputs.items()
              if name != "topk_ids"}
    expected = reference_experts(leaves["hidden_states"], leaves["w_gate_up"], leaves["w_down"], inputs["topk_ids"],
                                 leaves["topk_weights"], b_gate_up=leaves.get("b_gate_up"),
                                 b_down=leaves.get("b_down"), **case_options(case))
    expected.backward(grad_out)
    assert_fp32_close(out, expected)
    for name, grad in grads.items():
        assert_fp32_close(grad, leaves[name].grad, name=f"d{name}")


@pytest.mark.parametrize("case", CASES[1::5], ids=case_id)
def test_fused_experts_is_routed_experts_with_keywords(case, seed):
    inputs, _ = case_inputs(case, seed)
    options = case_options(case)
    weights = ExpertWeights(inputs["w_gate_up"], inputs["w_down"], inputs.get("b_gate_up"), inputs.get("b_down"))
    via_spec = routed_experts(inputs["hidden_states"], weights, inputs["topk_ids"], inputs["topk_weights"],
                              ExpertSpec(**options))
    via_keywords = tpmoe.fused_experts(inputs["hidden_states"], inputs["w_gate_up"], inputs["w_down"],
                                       inputs["topk_ids"], inputs["topk_weights"], b_gate_up=inputs.get("b_gate_up"),
                                       b_down=inputs.get("b_down"), **options)
    assert torch.equal(via_spec, via_keywords)


def test_config_expert_spec_carries_every_field():
    config = MoEConfig(hidden_size=8, intermediate_size=6, num_experts=4, top_k=2, activation="clamped_swiglu",
                       layout="gpt_oss", swiglu_alpha=1.5, swiglu_limit=3.0)
    assert config.expert_spec == ExpertSpec("clamped_swiglu", "gpt_oss", True, 1.5, 3.0)
    assert config.expert_spec.with_layout("concatenated").layout == "concatenated"
    spec = ExpertSpec(alpha=2, limit=5)
    assert type(spec.alpha) is float and type(spec.limit) is float  # the ops' schemas take doubles
    assert spec.op_args() == ("silu", "concatenated", True, 2.0, 5.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.gated = False


@pytest.mark.parametrize("fields, match", [
    (dict(activation="swish"), r"ExpertSpec.activation: expected one of .*got 'swish'"),
    (dict(layout="stacked"), r"ExpertSpec.layout: expected one of .*got 'stacked'"),
    (dict(activation="clamped_swiglu", gated=False),
     r"ExpertSpec.gated: clamped_swiglu is a gated activation, expected gated=True, got False"),
])
def test_bad_spec_names_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        ExpertSpec(**fields)


def test_routed_experts_bad_arguments():
    x, ids, weights = torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    experts = ExpertWeights(torch.randn(2, 12, 8), torch.randn(2, 8, 6))
    with pytest.raises(TypeError, match="spec: expected a tpmoe.ExpertSpec, got dict"):
        routed_experts(x, experts, ids, weights, dict(activation="silu"))
    with pytest.raises(TypeError, match="weights: expected a tpmoe.weights.ExpertWeights, got tuple"):
        routed_experts(x, tuple(experts), ids, weights)
    with pytest.raises(ValueError, match=r"weights.format: expected one of \('dense', 'fp8_block', 'mxfp4'\), got 'fp8'"):
        routed_experts(x, experts._replace(format="fp8"), ids, weights)
    with pytest.raises(ValueError, match="w_down: expected shape"):
        routed_experts(x, experts._replace(w_down=torch.randn(2, 8, 5)), ids, weights)
    with pytest.raises(ValueError, match="backend: expected one of"):
        routed_experts(x, experts, ids, weights, backend="gpu")
