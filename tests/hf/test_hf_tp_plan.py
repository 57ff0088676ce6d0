"""Side by side with transformers' own tensor parallelism (Qwen3-MoE, world size 2, gloo on CPU).

A tiny Qwen3-MoE checkpoint is saved in the test; each rank then loads it three ways:
  1. one process, no TP (the reference: logits and every loss gradient);
  2. `from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"))`: transformers
     shards attention (DTensor); up to 5.24 its plan shards the routed experts too
     ("packed_colwise"/"rowwise"/"moe_tp_experts"), from 5.25 it leaves them whole;
  3. the same as 2, then `tpmoe.hf.apply(model, model._device_mesh)` takes over the MoE blocks
     (no reload): from the local DTensor shards where the plan sharded the experts (the report
     says "local shards": tpmoe cuts by DTensor's rule, so transformers' chunks are its own at
     any world size), else from the whole tensors ("full"); attention stays as transformers
     sharded it.
2 and 3 must give the reference logits and gradients (fp32, 1e-5 relative; DTensor gradients
compared after full_tensor(), tpmoe's expert gradients against the matching slice). Collectives
are counted per MoE block (tests/support/hf_models.PerBlockCollectives): tpmoe's must be 1 forward and
1 backward; transformers' are recorded (5.23: 1 forward, 2 backward: one all-reduce for the
input gradient and one for the routing weights' gradient) and must be seen at all, so that the
counter is shown not to be blind to them.

Notes from running transformers 5.23 on CPU/gloo:
  - the "auto" plan derives the TP size from the WORLD_SIZE environment variable (torchrun
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

from support import seed_of  # noqa: E402
from support.dist_utils import SharedSpawns  # noqa: E402
from support.tolerances import FP32_RTOL  # noqa: E402

FAMILY = "qwen3_moe"


def _error(actual, reference):
    from support.tolerances import max_rel_error
    assert tuple(actual.shape) == tuple(reference.shape), (tuple(actual.shape), tuple(reference.shape))
    return max_rel_error(actual, reference)


def _full(tensor):
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _load(path, tp, dtype=torch.float32):
    from transformers import AutoConfig

    from support.hf_families import causal_lm_class
    from transformers import DistributedConfig
    kwargs = dict(distributed_config=DistributedConfig(tp_plan="auto")) if tp else {}
    model_class = causal_lm_class(AutoConfig.from_pretrained(path))
    return model_class.from_pretrained(path, dtype=dtype, experts_implementation="eager", **kwargs).eval()


def _run(model, input_ids, counter, block_names):
    from support.hf_models import PerBlockCollectives
    per_block = PerBlockCollectives(counter, {name: model.get_submodule(name) for name in block_names})
    model.zero_grad(set_to_none=True)
    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    per_block.remove()
    return output.logits.detach(), per_block


def _ranks(rank, world_size, path, seed):
    # What torchrun would have set: transformers derives the TP size of the "auto" plan from it.
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    from support.dist_utils import CollectiveCounter
    from support.hf_models import hf_to_tpmoe_weights
    from tpmoe.sharding import shard_moe_weights

    import tpmoe.hf

    input_ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
    reference = _load(path, tp=False)
    block_names = [f"model.layers.{i}.mlp" for i in range(reference.config.num_hidden_layers)]
    results = {}
    with CollectiveCounter() as counter:
        logits_ref, _ = _run(reference, input_ids, counter, block_names)
        grads_ref = {name: p.grad.detach().clone() for name, p in reference.named_parameters()}
        experts_ref = {name: hf_to_tpmoe_weights(reference.get_submodule(name), grad=True)
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


# world size -> the CausalLM's overrides. I = 10 over 2 ranks: transformers' chunks (5, 5) are
# tpmoe's, so the shards are taken as they are. Over 3 ranks both chunk I = 10 as (4, 4, 2) (tpmoe
# cuts by DTensor's rule): taken as they are too. 6 query / 3 key-value heads, because
# transformers' attention needs heads divisible by the TP size.
TP_PLAN_OVERRIDES = {2: {}, 3: dict(num_attention_heads=6, num_key_value_heads=3, head_dim=4)}


@pytest.fixture(scope="module")
def spawns(request, tmp_path_factory):
    """Every test's ranks, one spawn per world size (2, 3), each case with its own test's seed and
    checkpoints (saved here, before the spawn); and whether the installed plan shards Qwen3's
    routed experts, per world size."""
    from support.hf_families import causal_lm_config, make_family_causal_lm
    from support.hf_models import make_hf_causal_lm

    module = request.node.nodeid
    cases, experts_in_plan = {}, {}
    for index, (world_size, overrides) in enumerate(TP_PLAN_OVERRIDES.items()):
        seed = seed_of(f"{module}::test_take_over_from_transformers_tp_plan"
                       f"[{world_size}-overrides{index}-local shards-I_local{index}]")
        model = make_hf_causal_lm(FAMILY, seed, **overrides)
        experts_in_plan[world_size] = plan_shards_routed_experts(model.config)
        path = tmp_path_factory.mktemp("qwen3_moe")
        model.save_pretrained(path)
        cases[f"{FAMILY} at world {world_size}"] = (world_size, _ranks, (str(path), seed))
    for world_size in (2, 3):
        seed = seed_of(f"{module}::test_take_over_every_shared_expert_family_from_tp_plan[{world_size}]")
        root = tmp_path_factory.mktemp("families")
        for family in PLAN_FAMILIES:
            heads = _heads_for(world_size, causal_lm_config(family))
            make_family_causal_lm(family, seed, **heads).save_pretrained(root / family)
        cases[f"every family at world {world_size}"] = (world_size, _take_over, (str(root), seed, PLAN_FAMILIES))
    seed = seed_of(f"{module}::test_a_weight_tpmoe_cannot_take_is_named_with_its_placement")
    cases["misshapen"] = (2, _misshapen, (seed,))
    # 300 s: the every-family case's own (30 models loaded twice per rank between collectives).
    return SharedSpawns(cases, timeout_s=300), experts_in_plan


@pytest.mark.distributed
@pytest.mark.parametrize("world_size, overrides, source, I_local", [
    (2, TP_PLAN_OVERRIDES[2], "local shards", [5, 5]),
    pytest.param(3, TP_PLAN_OVERRIDES[3], "local shards", [4, 4, 2], marks=pytest.mark.slow),
])
def test_take_over_from_transformers_tp_plan(world_size, overrides, source, I_local, spawns):
    spawns, experts_in_plan = spawns
    experts_in_plan = experts_in_plan[world_size]
    if not experts_in_plan:
        source = "full"  # the installed release's plan leaves the experts whole: tpmoe cuts them
    per_rank = spawns.results(f"{FAMILY} at world {world_size}")
    for rank, results in enumerate(per_rank):
        hf, ours = results["transformers"], results["tpmoe"]
        # transformers really sharded the model (else the comparison says nothing about TP), the
        # experts exactly where its plan says.
        experts_placement = hf["placements"]["model.layers.0.mlp.experts.gate_up_proj"]
        assert ("_StridedShard" in experts_placement) == experts_in_plan, (experts_placement, experts_in_plan)
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
            # transformers' own block communicates too where its plan shards the experts (5.23: [1] and
            # [2]), and not at all where it leaves them whole (5.25); tpmoe's [1] shows the counter sees.
            communicates = hf["forward"][name][0] >= 1 and hf["backward"][name][0] >= 1
            assert communicates == experts_in_plan, (hf["forward"], hf["backward"], experts_in_plan)
        print(f"rank {rank}: collectives per MoE block forward/backward: transformers "
              f"{hf['forward']}/{hf['backward']}, tpmoe {ours['forward']}/{ours['backward']}")


# Every supported family with a shared expert whose tiny CausalLM builds on CPU (tests/support/hf_families.py),
# plus GPT-OSS, whose plan leaves the experts whole (tpmoe then shards them over the mesh; from 5.25 most
# families' plans do the same).
SHARED_EXPERT_FAMILIES = ("afmoe", "aria", "axk1", "axk2", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32",
                          "dots1", "ernie4_5_moe", "exaone_moe", "flint", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa",
                          "hunyuan_v1_moe", "hy_v3", "kolibri1", "laguna", "lara_mini", "minimax_m3_vl", "mistral4",
                          "llama4", "nemotron_h", "qwen2_moe", "qwen3_5_moe", "qwen3_next", "qwen4_exp", "solar_open")
PLAN_FAMILIES = SHARED_EXPERT_FAMILIES + ("gpt_oss",)


def plan_shards_routed_experts(config) -> bool:
    """Whether the installed transformers' TP plan for this config shards the routed experts
    (Qwen3-MoE's up to 5.24, Llama-4's in 5.25; the shared experts' MLPs do not count)."""
    return any(".experts." in key and "shared" not in key for key in (config.base_model_tp_plan or {}))


def _heads_for(world_size, config):
    """Attention heads divisible by the TP size (transformers shards attention by heads)."""
    if world_size == 2:
        return {}
    kv = getattr(config, "num_key_value_heads", None)
    return dict(num_attention_heads=6, num_key_value_heads=6 if kv == getattr(config, "num_attention_heads", 0) else 3)


def _take_over(rank, world_size, root, seed, families):
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    from support.dist_utils import CollectiveCounter
    from support.hf_models import PerBlockCollectives

    import tpmoe.hf

    input_ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
    results = {}
    with CollectiveCounter() as counter:
        for family in families:
            path = os.path.join(root, family)
            reference = _load(path, tp=False, dtype=torch.float64)
            reference.zero_grad(set_to_none=True)
            logits_ref = reference(input_ids, labels=input_ids)
            logits_ref.loss.backward()
            grads_ref = {name: p.grad.detach().clone() for name, p in reference.named_parameters()
                         if p.grad is not None}
            model = _load(path, tp=True, dtype=torch.float64)
            placements = {name: str(getattr(p, "placements", "plain")) for name, p in model.named_parameters()}
            hf_local_storage = {p.to_local().data_ptr() for p in model.parameters() if hasattr(p, "to_local")}
            report = tpmoe.hf.apply(model)
            experts_in_plan = plan_shards_routed_experts(model.config.get_text_config())
            blocks = {entry.name: model.get_submodule(entry.name) for entry in report}
            per_block = PerBlockCollectives(counter, blocks)
            model.zero_grad(set_to_none=True)
            output = model(input_ids, labels=input_ids)
            output.loss.backward()
            per_block.remove()
            errors = {"logits": _error(output.logits.detach(), logits_ref.logits.detach())}
            from support.hf_families import expected_local_grads, local_grad
            grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            for name, expected in expected_local_grads(reference, grads_ref, model, rank, world_size).items():
                if expected is None or name not in grads:
                    errors[f"{name} (missing)"] = float(expected is not None) + float(name in grads)
                    continue
                # tpmoe's parameters against this rank's slice, transformers' (attention) whole.
                got = local_grad(grads[name]) if ".block." in name else _full(grads[name])
                errors[name] = _error(got, expected)
            state_dict = tpmoe.hf.gather_state_dict(model)
            original = reference.state_dict()
            results[family] = dict(
                errors=errors, forward=per_block.forward, backward=per_block.backward, placements=placements,
                report=[(e.name, e.mode, e.shards, e.I_local, e.intermediate_size, e.source) for e in report],
                bitwise=sorted(state_dict) == sorted(original) and all(torch.equal(state_dict[n], t)
                                                                        for n, t in original.items()),
                # Per block taken from transformers' shards: whether a parameter kept their storage.
                uncopied=[any(p.to_local().data_ptr() in hf_local_storage for p in
                              model.get_submodule(e.name).block.parameters()) for e in report
                          if e.source == "local shards"],
                experts_in_plan=experts_in_plan)
    return results


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_take_over_every_shared_expert_family_from_tp_plan(world_size, spawns):
    """from_pretrained with the "auto" TP plan, then apply(model): whatever mix the plan left (DTensor routed
    experts, plain shared experts, sharded shared experts, nothing sharded at all for GPT-OSS), the
    model computes the one-process logits and every gradient, each MoE block with ONE collective
    forward and ONE backward, and gather_state_dict gives the one-process state dict bit for bit.

    In float64: transformers' own sharded attention sums in another order than one process, which
    in float32 alone reaches ~1e-5 on some norm gradients; in float64 what remains is the float32
    rounding that several families' routers do on purpose (softmax(dtype=float32)), at ~1e-7."""
    per_rank = spawns[0].results(f"every family at world {world_size}")
    from tpmoe.sharding import shard_sizes
    for family in PLAN_FAMILIES:
        for rank, results in enumerate(per_rank):
            result = results[family]
            where = f"{family}, rank {rank} of {world_size}"
            for name, error in result["errors"].items():
                assert error <= FP32_RTOL, f"{where}: {name} max relative error {error:.3e} > {FP32_RTOL:.0e}"
            assert result["report"], where
            for name, mode, shards, I_local, intermediate, source in result["report"]:
                assert shards == (rank, world_size), (where, name, shards)
                assert I_local == shard_sizes(intermediate, world_size)[rank], (where, name, I_local)
            for name in result["forward"]:
                assert result["forward"][name] == [1] and result["backward"][name] == [1], \
                    f"{where}: {name} forward {result['forward'][name]}, backward {result['backward'][name]}"
            assert result["bitwise"], f"{where}: gather_state_dict differs from the one-process state dict"
            # transformers' local shards are handed over, not copied (a one-part weight at least).
            assert all(result["uncopied"]), f"{where}: the expert shards were copied {result['uncopied']}"
        # The routed experts are sharded by transformers exactly where the installed plan says
        # (then tpmoe takes its shards), else whole (then tpmoe cuts them).
        placements = per_rank[0][family]["placements"]
        experts = [n for n in placements if n.endswith(("experts.gate_up_proj", "experts.up_proj"))]
        assert experts, f"{family}: no routed experts among {sorted(placements)[:5]}..."
        assert ("Shard" in placements[experts[0]]) == per_rank[0][family]["experts_in_plan"], \
            (family, placements[experts[0]], per_rank[0][family]["experts_in_plan"])
    # At least one family's experts come as transformers' shards (the "local shards" path is exercised).
    assert any(per_rank[0][family]["experts_in_plan"] for family in PLAN_FAMILIES), \
        "no family's TP plan shards its routed experts: nothing here takes over transformers' expert shards"
    # ... and the no-copy check above saw at least one such block (all([]) would pass unseen).
    assert any(per_rank[0][family]["uncopied"] for family in PLAN_FAMILIES), \
        "no block came from transformers' local shards: the no-copy hand-over was not checked"


def _misshapen(rank, world_size, seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from support.dist_utils import error_of
    from support.hf_families import make_family_block

    import tpmoe.hf

    holder = make_family_block("qwen2_moe.Qwen2MoeSparseMoeBlock", seed)
    mesh = init_device_mesh("cpu", (world_size,))
    experts = holder.mlp.experts
    # A checkpoint whose down projection has one intermediate column too many, as transformers shards it.
    wrong = torch.randn(experts.down_proj.shape[0], experts.down_proj.shape[1], experts.down_proj.shape[2] + 1)
    experts.down_proj = torch.nn.Parameter(distribute_tensor(wrong, mesh, [Shard(2)]))
    before = [type(m).__name__ for m in holder.modules()]
    error = error_of(lambda: tpmoe.hf.apply(holder))
    return error, before == [type(m).__name__ for m in holder.modules()]


@pytest.mark.distributed
def test_a_weight_tpmoe_cannot_take_is_named_with_its_placement(spawns):
    for error, unchanged in spawns[0].results("misshapen"):
        assert error is not None and error[0] == "ValueError", error
        assert "mlp.experts.down_proj (a DTensor (Shard(dim=2),) on a 1-D mesh" in error[1], error[1]
        assert "its whole shape is (8, 24, 11), expected (8, 24, 10)" in error[1], error[1]
        assert unchanged, "apply changed the model before refusing it"
