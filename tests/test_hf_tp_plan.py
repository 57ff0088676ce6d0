"""Side by side with transformers' own tensor parallelism (Qwen3-MoE, world size 2, gloo on CPU).

A tiny Qwen3-MoE checkpoint is saved in the test; each rank then loads it three ways:
  1. one process, no TP (the reference: logits and every loss gradient);
  2. `from_pretrained(path, tp_plan="auto")`: transformers shards attention (DTensor), and the
     experts with its "packed_colwise"/"rowwise"/"moe_tp_experts" plan;
  3. the same as 2, then `tpmoe.hf.apply(model, model._device_mesh)` takes over the MoE blocks
     from the local DTensor shards (no reload; the report says "local shards"; at world size 3,
     where transformers' chunks differ from tpmoe's, "resharded"), attention stays as
     transformers sharded it.
2 and 3 must give the reference logits and gradients (fp32, 1e-5 relative; DTensor gradients
compared after full_tensor(), tpmoe's expert gradients against the matching slice). Collectives
are counted per MoE block (tests/hf_models.PerBlockCollectives): tpmoe's must be 1 forward and
1 backward; transformers' are recorded (5.23: 1 forward, 2 backward: one all-reduce for the
input gradient and one for the routing weights' gradient) and must be seen at all, so that the
counter is shown not to be blind to them.

Notes from running transformers 5.23 on CPU/gloo:
  - `tp_plan="auto"` derives the TP size from the WORLD_SIZE environment variable (torchrun
    sets it); the spawned ranks here set WORLD_SIZE/RANK/LOCAL_RANK as torchrun would.
  - the default experts implementation "grouped_mm" fails on CPU when a shard's row is not a
    multiple of 16 bytes ("RuntimeError: strides should be multiple of 16 bytes" from
    torch._grouped_mm; here I_local = 5 fp32 = 20 bytes), so transformers' side runs its "eager"
    experts loop.
"""
import os

import pytest
import torch

pytest.importorskip("transformers", reason="tpmoe.hf needs transformers (pip install -e .[hf])")

from dist_utils import run_distributed  # noqa: E402
from tolerances import FP32_RTOL  # noqa: E402

FAMILY = "qwen3_moe"


def _error(actual, reference):
    from tolerances import max_rel_error
    assert tuple(actual.shape) == tuple(reference.shape), (tuple(actual.shape), tuple(reference.shape))
    return max_rel_error(actual, reference)


def _full(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _load(path, tp):
    from transformers import AutoModelForCausalLM
    kwargs = dict(tp_plan="auto") if tp else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager",
                                                **kwargs).eval()


def _run(model, input_ids, counter, block_names):
    from hf_models import PerBlockCollectives
    per_block = PerBlockCollectives(counter, {name: model.get_submodule(name) for name in block_names})
    model.zero_grad(set_to_none=True)
    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    per_block.remove()
    return output.logits.detach(), per_block


def _ranks(rank, world_size, path, seed):
    # What torchrun would have set: transformers derives the TP size of tp_plan="auto" from it.
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    from dist_utils import CollectiveCounter
    from hf_models import hf_to_tpmoe_weights
    from tpmoe.sharding import shard_moe_weights

    import tpmoe.hf

    input_ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
    reference = _load(path, tp=False)
    block_names = [f"model.layers.{i}.mlp" for i in range(reference.config.num_hidden_layers)]
    results = {}
    with CollectiveCounter() as counter:
        logits_ref, _ = _run(reference, input_ids, counter, block_names)
        grads_ref = {name: p.grad.detach().clone() for name, p in reference.named_parameters()}
        experts_ref = {name: hf_to_tpmoe_weights(FAMILY, reference.get_submodule(name), grad=True)
                       for name in block_names}

        hf_tp = _load(path, tp=True)
        placements = {name: str(getattr(p, "placements", "plain")) for name, p in hf_tp.named_parameters()}
        logits, per_block = _run(hf_tp, input_ids, counter, block_names)
        errors = {"logits": _error(logits, logits_ref)}
        for name, parameter in hf_tp.named_parameters():
            errors[name] = _error(_full(parameter.grad), grads_ref[name])
        results["transformers"] = dict(errors=errors, forward=per_block.forward, backward=per_block.backward,
                                       placements=placements)

        taken_over = _load(path, tp=True)
        report = tpmoe.hf.apply(taken_over, taken_over._device_mesh)
        logits, per_block = _run(taken_over, input_ids, counter, block_names)
        errors = {"logits": _error(logits, logits_ref)}
        for name, parameter in taken_over.named_parameters():
            owner = next((block for block in block_names if name.startswith(block + ".")), None)
            if owner is None:
                errors[name] = _error(_full(parameter.grad), grads_ref[name])
        for name in block_names:
            block = taken_over.get_submodule(name).block
            expected = shard_moe_weights(block.config, experts_ref[name], rank, world_size)
            for weight_name, grad in block.local_grads().items():
                errors[f"{name}.{weight_name}"] = _error(grad, expected[weight_name])
        attention_still_dtensor = all(placements[n] == str(getattr(p, "placements", "plain"))
                                      for n, p in taken_over.named_parameters() if ".mlp." not in n)
        state_dict = tpmoe.hf.gather_state_dict(taken_over)
        original = reference.state_dict()
        bitwise = sorted(state_dict) == sorted(original) and all(
            torch.equal(state_dict[n], t) for n, t in original.items())
        results["tpmoe"] = dict(errors=errors, forward=per_block.forward, backward=per_block.backward,
                                report=[(e.name, e.shards, e.I_local, e.source) for e in report],
                                attention_still_dtensor=attention_still_dtensor, state_dict_bitwise=bitwise)
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, overrides, source, I_local", [
    # I = 10 over 2 ranks: transformers' chunks (5, 5) are tpmoe's, so the shards are taken as they are.
    (2, {}, "local shards", [5, 5]),
    # Over 3 ranks transformers chunks I = 10 as (4, 4, 2) and tpmoe as (4, 3, 3): re-cut. 6 query /
    # 3 key-value heads, because transformers' attention needs heads divisible by the TP size.
    pytest.param(3, dict(num_attention_heads=6, num_key_value_heads=3, head_dim=4), "resharded", [4, 3, 3],
                 marks=pytest.mark.slow),
])
def test_take_over_from_transformers_tp_plan(world_size, overrides, source, I_local, tmp_path, seed):
    from hf_models import make_hf_causal_lm
    make_hf_causal_lm(FAMILY, seed, **overrides).save_pretrained(tmp_path)
    per_rank = run_distributed(_ranks, world_size, str(tmp_path), seed, timeout_s=120)
    for rank, results in enumerate(per_rank):
        hf, ours = results["transformers"], results["tpmoe"]
        # transformers really sharded the model (else the comparison says nothing about TP).
        assert "_StridedShard" in hf["placements"]["model.layers.0.mlp.experts.gate_up_proj"], hf["placements"]
        assert "Shard(dim=0)" in hf["placements"]["model.layers.0.self_attn.q_proj.weight"], hf["placements"]
        for side in (hf, ours):
            for name, error in side["errors"].items():
                assert error <= FP32_RTOL, f"rank {rank}: {name} max relative error {error:.3e} > {FP32_RTOL:.0e}"
        assert all(entry[1] == (rank, world_size) and entry[2] == I_local[rank] and entry[3] == source
                   for entry in ours["report"]), ours["report"]
        assert ours["attention_still_dtensor"], "apply changed how transformers sharded the dense layers"
        assert ours["state_dict_bitwise"], "gather_state_dict differs from the one-process state dict"
        for name in ours["forward"]:
            assert ours["forward"][name] == [1] and ours["backward"][name] == [1], \
                f"tpmoe {name}: forward {ours['forward'][name]}, backward {ours['backward'][name]} collectives"
            # transformers' own block communicates too (5.23: [1] and [2]); the counter sees it.
            assert hf["forward"][name][0] >= 1 and hf["backward"][name][0] >= 1, (hf["forward"], hf["backward"])
        print(f"rank {rank}: collectives per MoE block forward/backward: transformers "
              f"{hf['forward']}/{hf['backward']}, tpmoe {ours['forward']}/{ours['backward']}")
