"""MoEConfig and the weight checker reject what makes no sense, naming the field."""
import pytest
import torch

from tpmoe import MoEConfig, check_moe_weights, expected_shapes, random_moe_weights


@pytest.mark.parametrize("kwargs,pieces", [
    (dict(top_k=5), ["top_k", "<= num_experts (4)", "5"]),
    (dict(top_k=0), ["top_k", "positive int", "0"]),
    (dict(hidden_size=2.5), ["hidden_size", "positive int", "2.5"]),
    (dict(scoring="softmax2"), ["scoring", "softmax2"]),
    (dict(activation="swish"), ["activation", "swish"]),
    (dict(layout="packed"), ["layout", "packed"]),
    (dict(activation="clamped_swiglu", gated=False), ["gated", "clamped_swiglu"]),
    (dict(activation="clamped_silu", gated=False), ["gated", "clamped_silu"]),
    (dict(activation="silu_clamped", gated=False), ["gated", "silu_clamped"]),
    (dict(activation="softcapped_swiglu", gated=False), ["gated", "softcapped_swiglu"]),
    (dict(scoring="sigmoid_group", n_group=3), ["n_group", "divisor of num_experts (4)", "3"]),
    (dict(scoring="sigmoid_group", n_group=2, topk_group=3), ["topk_group", "<= n_group (2)", "3"]),
    (dict(correction_bias=True), ["correction_bias", "sigmoid_group", "softmax"]),
    (dict(shared_expert_gate=True), ["shared_expert_gate", "shared_intermediate_size"]),
    (dict(shared_intermediate_size=-1), ["shared_intermediate_size", ">= 0", "-1"]),
])
def test_bad_config_names_the_field(kwargs, pieces):
    arguments = dict(hidden_size=8, intermediate_size=6, num_experts=4, top_k=2)
    arguments.update(kwargs)
    with pytest.raises(ValueError) as info:
        MoEConfig(**arguments)
    for piece in pieces:
        assert piece in str(info.value), f"{piece!r} not in {info.value}"


def test_gated_only_activations_are_activations_and_relu2_runs_without_gate():
    from tpmoe.config import ACTIVATIONS, GATED_ONLY_ACTIVATIONS
    assert set(GATED_ONLY_ACTIVATIONS) < set(ACTIVATIONS)
    for activation in ACTIVATIONS:
        MoEConfig(8, 6, 4, 2, activation=activation)
    assert MoEConfig(8, 6, 4, 2, activation="relu2", gated=False).gate_up_rows == 6


def test_weights_checker_names_missing_extra_and_misshapen():
    config = MoEConfig(8, 6, 4, 2, layout="gpt_oss", expert_bias=True, shared_intermediate_size=4,
                       shared_expert_gate=True)
    weights = random_moe_weights(config)
    check_moe_weights(config, weights)
    assert tuple(weights["w_gate_up"].shape) == (4, 8, 12) and tuple(weights["w_down"].shape) == (4, 6, 8)
    missing = {k: v for k, v in weights.items() if k != "b_down"}
    with pytest.raises(ValueError, match=r"missing 'b_down' \(expected shape \(4, 8\)"):
        check_moe_weights(config, missing)
    with pytest.raises(ValueError, match=r"unexpected entries \['extra'\]"):
        check_moe_weights(config, dict(weights, extra=torch.ones(1)))
    with pytest.raises(ValueError, match=r"\['w_down'\]: expected shape \(4, 6, 8\), got \(4, 8, 6\)"):
        check_moe_weights(config, dict(weights, w_down=torch.ones(4, 8, 6)))


def test_random_weights_same_generator_same_block_at_every_dtype():
    config = MoEConfig(8, 6, 4, 2, expert_bias=True)
    a = random_moe_weights(config, generator=torch.Generator().manual_seed(3))
    b = random_moe_weights(config, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    assert sorted(a) == sorted(expected_shapes(config))
    for name in a:
        assert torch.equal(a[name].to(torch.bfloat16), b[name])
        assert a[name].abs().min() > 0, f"{name} holds a zero"
