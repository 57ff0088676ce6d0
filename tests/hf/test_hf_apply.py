"""tpmoe.hf in one process: each family's tiny CausalLM, HF's own against the swapped one.

For every family (tests/support/hf_models.CAUSAL_LM_CONFIGS: 2 layers, vocab 61, random weights) in
fp32: logits within 1e-5 relative, the loss gradient of every parameter within 1e-5 relative
(expert weights compared under tpmoe's names), the router logits and aux loss that HF's
output_router_logits path collects, greedy generation of 8 tokens identical. Also:
experts_implementation="tpmoe", the gather_state_dict -> save_pretrained -> from_pretrained
round trip (bit for bit), Mixtral's synchronised router jitter, and the errors.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="tpmoe.hf needs transformers (pip install -e .[hf])")

from support.hf_models import (CAUSAL_LM_CONFIGS, CAUSAL_LM_MOE_LAYERS, causal_lm_config,  # noqa: E402
                               hf_to_tpmoe_weights, lm_loss_backward, make_hf_causal_lm, randomize_)
from support.tolerances import assert_fp32_close  # noqa: E402

import tpmoe.hf  # noqa: E402

FAMILIES = tuple(CAUSAL_LM_CONFIGS)
# Families whose model computes a load-balancing aux loss from the recorded router logits.
AUX_LOSS_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss")


def _input_ids(seed, batch=2, length=7, vocab=61):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def _compare_gradients(hf_model, swapped, report, family):
    """Every parameter's gradient: dense ones by name, expert blocks under tpmoe names."""
    swapped_modules = dict(swapped.named_modules())
    hf_modules = dict(hf_model.named_modules())
    block_names = [entry.name for entry in report]
    compared = 0
    for name, parameter in hf_model.named_parameters():
        if any(name.startswith(block + ".") for block in block_names):
            continue
        ours = swapped.get_parameter(name)
        assert parameter.grad is not None and ours.grad is not None, f"{family}: {name} has no gradient"
        assert parameter.grad.abs().max() > 0, f"{family}: {name} reference gradient is zero (vacuous)"
        assert_fp32_close(ours.grad, parameter.grad, f"{family}: {name}.grad")
        compared += 1
    for block in block_names:
        expected = hf_to_tpmoe_weights(hf_modules[block], grad=True)
        got = swapped_modules[block].block.local_grads()
        assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
        for weight_name, grad in expected.items():
            assert grad.abs().max() > 0, f"{family}: {block}.{weight_name} reference gradient is zero"
            assert_fp32_close(got[weight_name], grad, f"{family}: {block}.{weight_name}.grad")
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_swapped_model_matches_hf(family, seed):
    hf_model = make_hf_causal_lm(family, seed)
    swapped = copy.deepcopy(hf_model)
    report = tpmoe.hf.apply(swapped)

    moe_layers = CAUSAL_LM_MOE_LAYERS[family]
    assert [entry.layer for entry in report] == moe_layers, str(report)
    num_experts = swapped.config.num_local_experts if hasattr(swapped.config, "num_local_experts") \
        else swapped.config.num_experts
    for entry in report:
        assert entry.family == family and entry.shards == (0, 1) and entry.source == "full"
        assert entry.num_experts == num_experts and entry.I_local == entry.intermediate_size
    assert not any(isinstance(m, type(dict(hf_model.named_modules())[report[0].name]))
                   for m in swapped.modules()), "an HF MoE block survived apply"

    input_ids = _input_ids(seed)
    expected = lm_loss_backward(hf_model, input_ids)
    got = lm_loss_backward(swapped, input_ids)
    assert expected.logits.abs().max() > 0
    assert_fp32_close(got.logits, expected.logits, f"{family}: logits")
    if family in AUX_LOSS_FAMILIES:
        assert got.aux_loss is not None and len(got.router_logits) == len(expected.router_logits) == len(moe_layers)
        for ours, theirs in zip(got.router_logits, expected.router_logits):
            assert_fp32_close(ours, theirs, f"{family}: router_logits")
        assert_fp32_close(got.aux_loss, expected.aux_loss, f"{family}: aux_loss")
    _compare_gradients(hf_model, swapped, report, family)

    with torch.no_grad():
        prompt = input_ids[:1]
        hf_tokens = hf_model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        our_tokens = swapped.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert hf_tokens.shape[1] == prompt.shape[1] + 8
    assert torch.equal(our_tokens, hf_tokens), (our_tokens, hf_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_implementation_tpmoe(family, seed):
    assert tpmoe.hf.register_experts_implementation() == "tpmoe"
    hf_model = make_hf_causal_lm(family, seed)
    ours = copy.deepcopy(hf_model)
    ours.set_experts_implementation("tpmoe")
    assert ours.config._experts_implementation == "tpmoe"
    input_ids = _input_ids(seed)
    expected = lm_loss_backward(hf_model, input_ids)
    got = lm_loss_backward(ours, input_ids)
    assert_fp32_close(got.logits, expected.logits, f"{family}: logits")
    for (name, theirs), ours_parameter in zip(hf_model.named_parameters(), ours.parameters()):
        assert_fp32_close(ours_parameter.grad, theirs.grad, f"{family}: {name}.grad")


@pytest.mark.parametrize("family", FAMILIES)
def test_gather_state_dict_round_trips_bit_for_bit(family, seed, tmp_path):
    hf_model = make_hf_causal_lm(family, seed)
    swapped = copy.deepcopy(hf_model)
    tpmoe.hf.apply(swapped)
    state_dict = tpmoe.hf.gather_state_dict(swapped)
    original = hf_model.state_dict()
    assert sorted(state_dict) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(state_dict[name], tensor), name
    swapped.save_pretrained(tmp_path, state_dict=state_dict)
    reloaded = type(hf_model).from_pretrained(tmp_path, experts_implementation="eager")
    for name, tensor in original.items():
        assert torch.equal(reloaded.state_dict()[name], tensor), f"{family}: {name} changed in the round trip"


def test_mixtral_router_jitter_is_fixed_per_step_and_layer(seed):
    """Training-mode jitter: the same noise within a step (a checkpoint recompute redraws it
    exactly), new noise at the next root forward, a different draw per layer, and the block
    computes HF's block on the jittered input."""
    hf_model = make_hf_causal_lm("mixtral", seed)
    swapped = copy.deepcopy(hf_model)
    report = tpmoe.hf.apply(swapped, jitter_seed=seed)
    swapped.train()
    blocks = [swapped.get_submodule(entry.name) for entry in report]
    assert all(block.jitter_noise == hf_model.config.router_jitter_noise > 0 for block in blocks)
    x = torch.randn(2, 5, swapped.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        swapped(_input_ids(seed))  # one root forward: step 1
        first, again = blocks[0](x), blocks[0](x)
        assert torch.equal(first, again), "the same step must draw the same noise"
        assert not torch.equal(blocks[0]._jitter(x), blocks[1]._jitter(x)), "layers must draw different noise"
        jittered = blocks[0]._jitter(x)
        hf_block = hf_model.get_submodule(report[0].name)  # eval mode: HF adds no noise of its own
        assert_fp32_close(first, hf_block(jittered.clone()), "block on the jittered input")
        swapped(_input_ids(seed))  # step 2
        assert not torch.equal(blocks[0](x), first), "a new step must draw new noise"
        swapped.eval()
        assert_fp32_close(blocks[0](x), hf_block(x.clone()), "eval mode: no jitter")


def test_unsupported_family_names_family_and_class(seed):
    """Switch Transformers drops the tokens past an expert's capacity: no routed-experts block in
    tpmoe's sense (dropless); apply refuses with the reason, before changing anything."""
    from support.hf_families import make_family_block

    holder = make_family_block("switch_transformers.SwitchTransformersSparseMLP", seed)
    before = [type(m) for m in holder.modules()]
    with pytest.raises(tpmoe.hf.UnsupportedFamilyError,
                       match=r"SwitchTransformersSparseMLP of the family 'switch_transformers'.*capacity"):
        tpmoe.hf.apply(holder)
    assert [type(m) for m in holder.modules()] == before, "apply changed the model before refusing it"


def test_model_without_moe_blocks_is_an_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=10, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="found no MoE block in LlamaForCausalLM"):
        tpmoe.hf.apply(model)


def test_bad_arguments():
    model = make_hf_causal_lm("qwen3_moe", 0)
    with pytest.raises(TypeError, match="group: expected a torch.distributed ProcessGroup"):
        tpmoe.hf.apply(model, group="tp")
    with pytest.raises(TypeError, match="jitter_seed: expected an int"):
        tpmoe.hf.apply(model, jitter_seed=0.5)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        tpmoe.hf.apply("qwen3_moe")


@pytest.mark.parametrize("family, config_class, model_class, sizes", [
    # Families the scan finds supported beyond the six named ones: the same code as a reference.
    ("minimax", "MiniMaxConfig", "MiniMaxForCausalLM",
     dict(intermediate_size=10, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2)),
    ("glm4_moe", "Glm4MoeConfig", "Glm4MoeForCausalLM",
     dict(intermediate_size=36, moe_intermediate_size=10, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
          topk_group=1, n_shared_experts=1, first_k_dense_replace=0, head_dim=6)),
])
def test_other_supported_family_matches_hf(family, config_class, model_class, sizes, seed):
    config = getattr(transformers, config_class)(
        vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    hf_model = randomize_(getattr(transformers, model_class)(config), seed).eval()
    swapped = copy.deepcopy(hf_model)
    report = tpmoe.hf.apply(swapped)
    assert len(report) == 2 and all(entry.family == family for entry in report), str(report)
    input_ids = _input_ids(seed)
    with torch.no_grad():
        assert_fp32_close(swapped(input_ids).logits, hf_model(input_ids).logits, f"{family}: logits")


def test_causal_lm_config_is_tiny():
    config = causal_lm_config("qwen3_moe")
    assert config.num_hidden_layers == 2 and config.vocab_size == 61


def test_router_jitter_survives_gradient_checkpointing(seed):
    """The recompute of a checkpointed layer redraws the very noise of its first pass (the step
    counter only moves at the root forward), so the gradients equal those without checkpointing."""
    hf_model = make_hf_causal_lm("mixtral", seed)
    plain, checkpointed = copy.deepcopy(hf_model), copy.deepcopy(hf_model)
    for model in (plain, checkpointed):
        tpmoe.hf.apply(model, jitter_seed=seed)
        model.train()
    # transformers 5.23 renamed gradient_checkpointing_enable to activation_checkpointing_enable.
    enable = getattr(checkpointed, "activation_checkpointing_enable", None) or \
        checkpointed.gradient_checkpointing_enable
    enable()
    input_ids = _input_ids(seed)
    for _ in range(2):  # two steps: different noise each
        expected = lm_loss_backward(plain, input_ids)
        got = lm_loss_backward(checkpointed, input_ids)
        assert_fp32_close(got.logits, expected.logits, "logits")
        for (name, ours), theirs in zip(checkpointed.named_parameters(), plain.parameters()):
            assert_fp32_close(ours.grad, theirs.grad, f"{name}.grad")
