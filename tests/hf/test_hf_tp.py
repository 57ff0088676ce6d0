"""tpmoe.hf.apply under tensor parallelism (real gloo processes) against HF's one-process model.

One spawn per world size runs every case. In each rank, for each family's tiny CausalLM
(tests/support/hf_models.py; eval mode, fp32): HF's own model in one process gives the reference
logits and loss gradients; a copy swapped with `apply(model, WORLD)` must give the same logits
(1e-5 relative), the same gradient for every dense parameter, and for the expert blocks each
rank's gradient must equal the matching slice (tpmoe.sharding) of the one-process gradient.
Collectives are counted per MoE block: 1 all-reduce forward, 1 backward. gather_state_dict must
rebuild HF's state dict bit for bit on every rank. Mixtral in training mode (router jitter):
every rank must route every layer identically, and the logits must equal the one-process
tpmoe model's with the same jitter seed.
World size 2 runs all six families; world size 3 runs Qwen2-MoE (I = 10 -> 4/3/3 and shared
Is = 14 -> 5/5/4 columns: uneven shards).
"""
import copy
import hashlib

import pytest
import torch

pytest.importorskip("transformers", reason="tpmoe.hf needs transformers (pip install -e .[hf])")

from support.dist_utils import run_distributed  # noqa: E402
from support.hf_models import CAUSAL_LM_CONFIGS, lm_loss_backward  # noqa: E402
from support.tolerances import FP32_RTOL  # noqa: E402


def _error(actual, reference):
    from support.tolerances import max_rel_error
    assert tuple(actual.shape) == tuple(reference.shape), (tuple(actual.shape), tuple(reference.shape))
    return max_rel_error(actual, reference) if reference.numel() else 0.0


def _reference(hf_model, input_ids, family, block_names):
    """One process: logits, dense gradients by name, expert gradients in tpmoe names per block."""
    from support.hf_models import hf_to_tpmoe_weights
    output = lm_loss_backward(hf_model, input_ids)
    dense = {name: p.grad.detach().clone() for name, p in hf_model.named_parameters()
             if not any(name.startswith(block + ".") for block in block_names)}
    experts = {block: hf_to_tpmoe_weights(hf_model.get_submodule(block), grad=True) for block in block_names}
    return output.logits.detach(), dense, experts


def _digest(tensor):
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def _case(rank, world_size, family, seed, counter):
    import torch.distributed as dist

    from support.hf_models import PerBlockCollectives, make_hf_causal_lm
    from tpmoe.sharding import shard_moe_weights

    import tpmoe.hf

    hf_model = make_hf_causal_lm(family, seed)
    input_ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
    swapped = copy.deepcopy(hf_model)
    report = tpmoe.hf.apply(swapped, dist.group.WORLD)
    block_names = [entry.name for entry in report]
    logits_ref, dense_ref, experts_ref = _reference(hf_model, input_ids, family, block_names)

    blocks = {name: swapped.get_submodule(name) for name in block_names}
    per_block = PerBlockCollectives(counter, blocks)
    output = lm_loss_backward(swapped, input_ids)
    per_block.remove()
    result = {"report": [(e.layer, e.shards, e.I_local, e.Is_local, e.source) for e in report],
              "errors": {"logits": _error(output.logits, logits_ref)}, "zero_reference": [],
              "forward": per_block.forward, "backward": per_block.backward}
    for name, grad in dense_ref.items():
        result["errors"][name] = _error(swapped.get_parameter(name).grad, grad)
    for block_name, full_grads in experts_ref.items():
        block = blocks[block_name].block
        if "correction_bias" in block.config.__dict__ and block.config.correction_bias:
            full_grads = {**full_grads, "correction_bias": torch.zeros(block.config.num_experts)}
        expected = shard_moe_weights(block.config, full_grads, rank, world_size)
        for weight_name, grad in block.local_grads().items():
            result["errors"][f"{block_name}.{weight_name}"] = _error(grad, expected[weight_name])
            if full_grads[weight_name].abs().max() == 0:
                result["zero_reference"].append(f"{block_name}.{weight_name}")

    counter.take()
    state_dict = tpmoe.hf.gather_state_dict(swapped)
    original = hf_model.state_dict()
    result["state_dict_bitwise"] = sorted(state_dict) == sorted(original) and all(
        torch.equal(state_dict[name], tensor) for name, tensor in original.items())
    result["gather_counts"] = dict(counter.take())

    if family == "mixtral":
        result["jitter"] = _jitter_case(hf_model, input_ids, seed)
    return result


def _jitter_case(hf_model, input_ids, seed):
    """Training mode: per-layer routing digests (must agree over ranks) and the logits error
    against the one-process tpmoe model with the same jitter seed."""
    import torch.distributed as dist

    import tpmoe.hf

    one_process = copy.deepcopy(hf_model)
    tpmoe.hf.apply(one_process, jitter_seed=seed)
    sharded = copy.deepcopy(hf_model)
    report = tpmoe.hf.apply(sharded, dist.group.WORLD, jitter_seed=seed)
    digests = []

    def record(module, args, kwargs, output):
        _, _, topk_ids = kwargs["routing"]  # TpmoeHFBlock routes, then hands the routing to its MoEBlock
        digests.append(_digest(topk_ids))

    for entry in report:
        sharded.get_submodule(entry.name).block.register_forward_hook(record, with_kwargs=True)
    one_process.train()
    sharded.train()
    errors = []
    with torch.no_grad():
        for _ in range(2):  # two steps: two different draws of noise
            errors.append(_error(sharded(input_ids).logits, one_process(input_ids).logits))
    return {"digests": digests, "errors": errors}


def _all_families(rank, world_size, seed, families):
    from support.dist_utils import CollectiveCounter
    with CollectiveCounter() as counter:
        return {family: _case(rank, world_size, family, seed, counter) for family in families}


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, families", [(2, tuple(CAUSAL_LM_CONFIGS)), (3, ("qwen2_moe",))])
def test_hf_apply_tensor_parallel_matches_one_process(world_size, families, seed):
    per_rank = run_distributed(_all_families, world_size, seed, families, timeout_s=120)
    for family in families:
        for rank, results in enumerate(per_rank):
            result = results[family]
            where = f"{family}, rank {rank} of {world_size}"
            assert not result["zero_reference"], f"{where}: vacuous comparisons {result['zero_reference']}"
            for name, error in result["errors"].items():
                assert error <= FP32_RTOL, f"{where}: {name} max relative error {error:.3e} > {FP32_RTOL:.0e}"
            assert all(shards == (rank, world_size) for _, shards, _, _, _ in result["report"]), result["report"]
            assert all(source == "full" for *_, source in result["report"]), result["report"]
            for name in result["forward"]:
                assert result["forward"][name] == [1], f"{where}: {name} forward collectives {result['forward'][name]}"
                assert result["backward"][name] == [1], \
                    f"{where}: {name} backward collectives {result['backward'][name]}"
            assert result["state_dict_bitwise"], f"{where}: gather_state_dict is not HF's state dict bit for bit"
            assert result["gather_counts"] == {"all_gather_single": len(result["report"])} or \
                result["gather_counts"] == {"all_gather_into_tensor": len(result["report"])}, result["gather_counts"]
        if world_size == 3 and family == "qwen2_moe":
            assert sorted(r[family]["report"][0][2] for r in per_rank) == [2, 4, 4]   # I = 10: torch.chunk sizes
            assert sorted(r[family]["report"][0][3] for r in per_rank) == [4, 5, 5]   # Is = 14
        if "jitter" in per_rank[0][family]:
            digests = [results[family]["jitter"]["digests"] for results in per_rank]
            assert len(digests[0]) == 4 and len(set(digests[0][:2])) == 2, "expected 2 layers x 2 steps of routing"
            assert all(d == digests[0] for d in digests[1:]), "ranks routed differently under router jitter"
            assert digests[0][:2] != digests[0][2:], "the second step drew the same noise as the first"
            for rank, results in enumerate(per_rank):
                for error in results[family]["jitter"]["errors"]:
                    assert error <= FP32_RTOL, f"jitter: rank {rank} logits error {error:.3e}"
