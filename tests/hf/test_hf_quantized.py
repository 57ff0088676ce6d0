"""tpmoe.hf on transformers models with quantized experts, against their dense twins.

The twin (tests/support/hf_quantized_models.py) is the same model with transformers' own
dequantization of each quantized expert weight, run by transformers' own experts. Fine-grained
FP8: a Qwen3-MoE and a Mixtral whose experts are transformers' FP8Experts, which `tpmoe.hf.apply` reads in
place. MXFP4: a GPT-OSS whose checkpoint tensors (`*_blocks`, `*_scales`) `load_quantized_experts`
puts in place of its dense experts. In one process and at TP 2 and 3 (I_local no multiple of the
scale block): logits within fp32's 1e-5 (bf16: within twice the twin's own bf16 error against
float64), every gradient that still flows (attention, embeddings, norms, router, biases) equal to
the twin's (each rank's slice of it), and no expert weight left to train.
"""
import copy

import pytest
import torch

pytest.importorskip("transformers", reason="tpmoe.hf needs transformers (pip install -e .[hf])")

from support.allocations import LargestAllocation  # noqa: E402
from support.dist_utils import SharedSpawns  # noqa: E402
from support.hf_models import hf_to_tpmoe_weights, lm_loss_backward  # noqa: E402
from support.hf_quantized_models import FP8_BLOCK, fp8_model, mxfp4_gpt_oss  # noqa: E402
from support.tolerances import FP32_RTOL, assert_within_twice_same_dtype, max_rel_error  # noqa: E402

# (format, family): transformers' FP8Experts in place of two families' experts; GPT-OSS's MXFP4.
FORMATS = ("fp8-qwen3_moe", "fp8-mixtral", "mxfp4-gpt_oss")


def _swapped(fmt, seed, group=None, dtype=torch.float32):
    """(tpmoe's model, the dense twin) of a format's tiny model."""
    import tpmoe.hf

    if fmt.startswith("fp8"):
        quantized, dense = fp8_model(fmt.split("-")[1], seed, dtype)
        tpmoe.hf.apply(quantized, group)
        return quantized, dense
    dense, tensors = mxfp4_gpt_oss(seed, dtype)
    swapped = copy.deepcopy(dense)
    tpmoe.hf.apply(swapped, group)
    assert tpmoe.hf.load_quantized_experts(swapped, tensors) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    return swapped, dense


def _errors(swapped, dense, seed, rank=0, world_size=1):
    """Relative errors of tpmoe's logits and of every gradient, against the dense twin's."""
    from tpmoe.sharding import shard_weight

    from tpmoe.hf.module import TpmoeHFBlock

    input_ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
    reference = lm_loss_backward(dense, input_ids)
    output = lm_loss_backward(swapped, input_ids)
    errors = {"logits": max_rel_error(output.logits, reference.logits)}
    trained = dict(swapped.named_parameters())
    for name, parameter in dense.named_parameters():
        if name in trained:
            errors[name] = max_rel_error(trained[name].grad, parameter.grad)
    blocks = {name: module for name, module in swapped.named_modules() if isinstance(module, TpmoeHFBlock)}
    assert blocks, "apply swapped no block"
    for name, module in blocks.items():
        block = module.block
        assert block.quantized_experts.format == ("mxfp4" if "GptOss" in type(dense).__name__ else "fp8_block")
        full = hf_to_tpmoe_weights(dense.get_submodule(name), grad=True)
        grads = block.local_grads()
        assert not {"w_gate_up", "w_down"} & set(grads), "quantized experts must not train"
        for weight, grad in grads.items():
            errors[f"{name}.{weight}"] = max_rel_error(
                grad, shard_weight(block.config, weight, full[weight], rank, world_size))
    return errors


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_process_equals_transformers_dequantized(fmt, seed):
    swapped, dense = _swapped(fmt, seed)
    errors = _errors(swapped, dense, seed)
    assert len(errors) > 10
    bad = {name: error for name, error in errors.items() if not error <= FP32_RTOL}
    assert not bad, bad


@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_within_twice_transformers_bf16(fmt, seed):
    """bf16 compute: tpmoe's logits' error against the float64 twin at most twice that of
    transformers' own bf16 twin (the quantized values are exact in both dtypes)."""
    swapped, dense = _swapped(fmt, seed, dtype=torch.bfloat16)
    dense64 = copy.deepcopy(dense).double()
    input_ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs, exact = (model(input_ids).logits for model in (swapped, dense, dense64))
    assert ours.dtype == torch.bfloat16
    assert_within_twice_same_dtype(ours, theirs, exact, name=f"{fmt} logits")


def _state_mismatches(swapped, fmt, seed):
    """Where tpmoe.hf.gather_state_dict(swapped) differs from the quantized model's own state as
    transformers holds it (FP8Experts' tensors; for GPT-OSS the dense model's with the
    checkpoint's MXFP4 tensors in place of its experts), bit for bit: [] when none."""
    import tpmoe.hf

    if fmt.startswith("fp8"):
        expected = fp8_model(fmt.split("-")[1], seed)[0].state_dict()
    else:
        dense, tensors = mxfp4_gpt_oss(seed)
        expected = {key: value for key, value in dense.state_dict().items()
                    if not key.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        expected.update(tensors)
    state = tpmoe.hf.gather_state_dict(swapped)
    mismatches = sorted(set(state) ^ set(expected))
    for key in set(state) & set(expected):
        mine, theirs = state[key], expected[key]
        if mine.dtype != theirs.dtype or mine.shape != theirs.shape or not torch.equal(
                mine.view(torch.uint8) if mine.dtype.itemsize == 1 else mine, theirs.view(torch.uint8)
                if theirs.dtype.itemsize == 1 else theirs):
            mismatches.append(key)
    return mismatches


@pytest.mark.parametrize("fmt", FORMATS)
def test_gather_state_dict_gives_transformers_quantized_tensors_back(fmt, seed):
    swapped, _ = _swapped(fmt, seed)
    assert _state_mismatches(swapped, fmt, seed) == []


def _tp_case(rank, world_size, fmt, seed):
    import torch.distributed as dist

    swapped, dense = _swapped(fmt, seed, dist.group.WORLD)
    local = [module.block.I_local for module in swapped.modules() if hasattr(module, "block")]
    errors = _errors(swapped, dense, seed, rank, world_size)
    return {"errors": errors, "I_local": local, "state mismatches": _state_mismatches(swapped, fmt, seed)}


SEED = 1234
# Under TP one family per format: FP8Experts reads alike in every family (one process covers both).
TP_FORMATS = ("fp8-qwen3_moe", "mxfp4-gpt_oss")
SPAWNS = SharedSpawns({(fmt, world_size): (world_size, _tp_case, (fmt, SEED))
                       for world_size in (2, 3) for fmt in TP_FORMATS})


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("fmt", TP_FORMATS)
def test_tensor_parallel_equals_transformers_dequantized(fmt, world_size):
    block = FP8_BLOCK if fmt.startswith("fp8") else 32
    per_rank = SPAWNS.results((fmt, world_size))
    local_sizes = [size for result in per_rank for size in result["I_local"]]
    assert any(size % block for size in local_sizes), local_sizes  # a shard cuts a scale block
    for rank, result in enumerate(per_rank):
        bad = {name: error for name, error in result["errors"].items() if not error <= FP32_RTOL}
        assert not bad, f"rank {rank}: {bad}"
        assert result["state mismatches"] == [], f"rank {rank}: gather_state_dict"


# ---------------------------------------------------------------- refusals and bad input

def _first_experts(model):
    return model.model.layers[0].mlp.experts


@pytest.mark.parametrize("change, expected", [
    (lambda experts: setattr(experts, "block_size", (FP8_BLOCK, 2 * FP8_BLOCK)), "square"),
    (lambda experts: setattr(experts, "activation_scheme", "static"), "activation_scheme 'static'"),
])
def test_fp8_experts_refused_before_any_change(change, expected, seed):
    import tpmoe.hf
    from transformers.integrations.finegrained_fp8 import FP8Experts

    quantized, _ = fp8_model("qwen3_moe", seed)
    change(_first_experts(quantized))
    with pytest.raises(tpmoe.hf.UnsupportedFamilyError, match=expected):
        tpmoe.hf.apply(quantized)
    assert all(isinstance(layer.mlp.experts, FP8Experts) for layer in quantized.model.layers)  # nothing swapped


def test_fp8_scale_blocks_straddling_gate_and_up_are_refused(seed):
    """I = 36 with B = 8: transformers' 9 row blocks of [gate; up] put gate and up rows in one block."""
    import tpmoe.hf

    quantized, _ = fp8_model("qwen3_moe", seed, moe_intermediate_size=36)
    with pytest.raises(tpmoe.hf.UnsupportedFamilyError, match=r"gate_up_proj_scale_inv of shape \(8, 9, 3\)"):
        tpmoe.hf.apply(quantized)


def test_load_quantized_experts_bad_input(seed):
    import tpmoe.hf

    dense, tensors = mxfp4_gpt_oss(seed)
    with pytest.raises(ValueError, match=r"call tpmoe.hf.apply\(model\) first"):
        tpmoe.hf.load_quantized_experts(dense, tensors)
    tpmoe.hf.apply(dense)
    with pytest.raises(TypeError, match="tensors: expected a mapping"):
        tpmoe.hf.load_quantized_experts(dense, list(tensors.values()))
    missing = dict(tensors)
    del missing["model.layers.1.mlp.experts.down_proj_scales"]
    with pytest.raises(KeyError, match="missing model.layers.1.mlp.experts.down_proj_scales"):
        tpmoe.hf.load_quantized_experts(dense, missing)
    wrong = {**tensors, "model.layers.0.mlp.experts.gate_up_proj_scales":
             tensors["model.layers.0.mlp.experts.gate_up_proj_scales"][:, :-1]}
    with pytest.raises(ValueError, match="scales"):
        tpmoe.hf.load_quantized_experts(dense, wrong)


def test_fp8_checkpoint_tensors_need_a_block_size(seed):
    """FP8Experts' fused tensors as a checkpoint holds them: the block size comes from the call or
    the config; loaded, the model equals the one apply read in place."""
    import tpmoe.hf

    quantized, dense = fp8_model("qwen3_moe", seed)
    tensors = {name: tensor for name, tensor in quantized.state_dict().items() if ".experts." in name}
    with pytest.raises(ValueError, match="no block size"):
        tpmoe.hf.load_quantized_experts(tpmoe_model := _applied(dense), tensors)
    assert tpmoe.hf.load_quantized_experts(tpmoe_model, tensors, block_size=FP8_BLOCK) == [
        "model.layers.0.mlp", "model.layers.1.mlp"]
    tpmoe.hf.apply(quantized)
    input_ids = torch.randint(3, 61, (1, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(tpmoe_model(input_ids).logits, quantized(input_ids).logits)


def test_apply_takes_checkpoint_experts_and_never_reads_the_models_own(seed):
    """apply(model, quantized_experts=tensors) on a GPT-OSS whose expert weights were never
    materialized (meta): the blocks run the checkpoint's MXFP4 experts; the model equals its
    dense twin. A bad tensor is refused before any block is swapped."""
    import tpmoe.hf

    dense, tensors = mxfp4_gpt_oss(seed)
    model = copy.deepcopy(dense)
    for layer in model.model.layers:
        for name in ("gate_up_proj", "down_proj"):
            old = getattr(layer.mlp.experts, name)
            setattr(layer.mlp.experts, name, torch.nn.Parameter(torch.empty(old.shape, device="meta")))
    broken = {**tensors, "model.layers.1.mlp.experts.down_proj_scales":
              tensors["model.layers.1.mlp.experts.down_proj_scales"][:1]}
    with pytest.raises(ValueError, match="quantized experts of model.layers.1.mlp"):
        tpmoe.hf.apply(model, quantized_experts=broken)
    assert type(model.model.layers[0].mlp).__name__ == "GptOssMLP"  # nothing swapped
    with pytest.raises(ValueError, match="quantized_block_size: expected None without quantized_experts"):
        tpmoe.hf.apply(model, quantized_block_size=8)
    with LargestAllocation() as largest:
        report = tpmoe.hf.apply(model, quantized_experts=tensors)
    assert [entry.source for entry in report] == ["full, mxfp4"] * 2
    # No block made a dense copy of its experts, even for a moment (the smaller, down, in float32).
    experts = dense.model.layers[0].mlp.experts
    assert largest.nbytes < experts.down_proj.numel() * 4, f"{largest.op} made {largest.nbytes} bytes"
    input_ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        error = max_rel_error(model(input_ids).logits, dense(input_ids).logits)
    assert error <= FP32_RTOL, error


def _applied(model):
    import tpmoe.hf

    swapped = copy.deepcopy(model)
    tpmoe.hf.apply(swapped)
    return swapped
