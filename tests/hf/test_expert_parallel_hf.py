"""tpmoe.hf.apply with expert parallelism (real gloo processes) against HF's one-process model.

One spawn per world size runs every case: world 2 on an ("ep",) DeviceMesh (EP 2), world 4 on an
("ep", "tp") mesh (EP 2 x TP 2). In each rank, for each family's tiny CausalLM in float64 (HF's
float32 router casts switched off on both sides, so the comparison is exact to summation order):
HF's own model over the GLOBAL batch of 3 sequences is the reference; the swapped copy runs
data-parallel over the EP dimension on this EP rank's sequences only (EP rank 0 holds 2, EP rank
1 holds 1: the ranks hold different token counts; the TP ranks of an EP rank the same ones). The
loss is a weighted sum of the logits (a sum over tokens, so that per-rank gradients add up to
the global one). Checked: this rank's logits; after the per-step sums (allreduce_router_grads for
the blocks' replicated parameters, one all-reduce over the EP group of
tpmoe.hf.data_parallel_parameters for the rest of the model, as DDP would) every gradient: dense
ones whole, expert ones as this rank's experts' TP slice of the one-process gradient; the
collectives per block (forward 3 all-to-alls, backward 2, each + 1 all-reduce with TP); the
report's expert range; gather_state_dict bit for bit against HF's state dict.

Families: Qwen3-MoE and Mixtral with E = 7 (uneven expert ranges 4/3), Qwen3-MoE's I = 9 at TP 2
(5/4 columns), GPT-OSS (interleaved layout, biases, its own returns), DeepSeek-V3 (group routing,
correction bias, shared experts, a dense first layer), Qwen2-MoE (shared expert behind a sigmoid
gate), GraniteMoeShared (experts mode: only its experts module is tpmoe's; its router and shared
MLP run as transformers wrote them, data-parallel). Also: the CLI's `tpmoe bench --ep` smoke, and
the refusals (a tp_plan-loaded model, a 2-D mesh with "ep" but no "tp", more EP ranks than experts).
Slow: every supported block of the snapshot (tests/support/hf_families.py, fp32) at EP 2 and EP 2 x TP 2,
one spawn per world size, against transformers' block over the global batch.
"""
import copy
import dataclasses
import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers", reason="tpmoe.hf needs transformers (pip install -e .[hf])")

from support import seed_of  # noqa: E402
from support.dist_utils import SharedSpawns  # noqa: E402
from support.tolerances import FP64_RTOL  # noqa: E402

# family -> its CausalLM config overrides (HF names) at each world size.
FAMILIES = {
    "qwen3_moe": {2: dict(num_experts=7), 4: dict(num_experts=7, moe_intermediate_size=9)},
    "mixtral": {2: dict(num_local_experts=7), 4: dict(num_local_experts=7)},
    "gpt_oss": {2: {}, 4: {}},
    "deepseek_v3": {2: {}, 4: {}},
    "qwen2_moe": {2: {}, 4: {}},
    "granitemoeshared": {2: {}, 4: {}},
}
SEQUENCES_PER_EP_RANK = (2, 1)   # a rank with fewer tokens
SEQUENCE_LENGTH = 5
VOCAB = 61


def _model(family, seed, overrides):
    from support.hf_families import make_family_causal_lm
    from support.hf_models import CAUSAL_LM_CONFIGS, make_hf_causal_lm

    if family in CAUSAL_LM_CONFIGS:
        return make_hf_causal_lm(family, seed, torch.float64, **overrides)
    return make_family_causal_lm(family, seed, torch.float64, **overrides)


def _error(actual, reference):
    from support.tolerances import max_rel_error
    assert tuple(actual.shape) == tuple(reference.shape), (tuple(actual.shape), tuple(reference.shape))
    return max_rel_error(actual, reference) if reference.numel() else 0.0


def _weighted_sum_backward(model, input_ids, weights):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids).logits
    (logits * weights).sum().backward()
    return logits.detach()


def _case(family, overrides, seed, mesh, counter):
    import torch.distributed as dist

    from support.hf_families import expected_local_grads, local_grad
    from support.hf_models import PerBlockCollectives, hf_router_float32_casts_disabled

    import tpmoe.hf
    from tpmoe.distributed import allreduce_gradients, allreduce_router_grads
    from tpmoe.sharding import expert_range

    ep_group = mesh.get_group("ep")
    tp_group = mesh.get_group("tp") if "tp" in mesh.mesh_dim_names else None
    ep_rank, ep_size = dist.get_rank(ep_group), dist.get_world_size(ep_group)
    tp_rank, tp_size = (dist.get_rank(tp_group), dist.get_world_size(tp_group)) if tp_group else (0, 1)
    generator = torch.Generator().manual_seed(seed)
    batch = sum(SEQUENCES_PER_EP_RANK)
    input_ids = torch.randint(3, VOCAB, (batch, SEQUENCE_LENGTH), generator=generator)
    weights = torch.randn(batch, SEQUENCE_LENGTH, VOCAB, generator=generator, dtype=torch.float64)
    first = sum(SEQUENCES_PER_EP_RANK[:ep_rank])
    mine = slice(first, first + SEQUENCES_PER_EP_RANK[ep_rank])

    hf_model = _model(family, seed, overrides)
    swapped = copy.deepcopy(hf_model)
    report = tpmoe.hf.apply(swapped, mesh)
    blocks = {entry.name: swapped.get_submodule(entry.name) for entry in report}
    for entry, module in blocks.items():
        replacement = module if hasattr(module, "block") else module.experts  # experts mode: block.experts
        if replacement.block.config.router_dtype is not None:
            # DeepSeek-V3 routes in float32 (as HF does), but HF does not with its casts off.
            replacement.block.config = dataclasses.replace(replacement.block.config, router_dtype=None)
    with hf_router_float32_casts_disabled():
        logits_ref = _weighted_sum_backward(hf_model, input_ids, weights)
        grads_ref = {name: p.grad.detach().clone() for name, p in hf_model.named_parameters() if p.grad is not None}
        per_block = PerBlockCollectives(counter, blocks)
        counter.take()
        logits = _weighted_sum_backward(swapped, input_ids[mine], weights[mine])
        per_block.remove()
    counter.take()
    block_summed = allreduce_router_grads(swapped)
    allreduce_gradients(tpmoe.hf.data_parallel_parameters(swapped), ep_group, kind="EP")
    step_counts = dict(counter.take())

    result = {"errors": {"logits": _error(logits, logits_ref[mine])}, "missing": [], "vacuous": [],
              "forward": per_block.forward, "backward": per_block.backward, "step": step_counts,
              "block_summed": block_summed,
              "report": [(e.mode, e.shards, e.ep, e.experts, e.num_experts, e.I_local, e.source) for e in report],
              "expected_experts": [expert_range(e.num_experts, ep_rank, ep_size) for e in report],
              "table": str(report), "where": (ep_rank, tp_rank)}
    expected = expected_local_grads(hf_model, grads_ref, swapped, tp_rank, tp_size, ep_rank=ep_rank, ep_size=ep_size)
    for name, grad in expected.items():
        got = swapped.get_parameter(name).grad
        got = None if got is None else local_grad(got)
        if grad is None or got is None:
            if (grad is None) != (got is None):
                result["missing"].append(name)
            continue
        if grad.numel() and grad.abs().max() == 0:
            result["vacuous"].append(name)
        result["errors"][name] = _error(got, grad)
    result["compared"] = len(result["errors"])

    counter.take()
    state_dict = tpmoe.hf.gather_state_dict(swapped)
    original = hf_model.state_dict()
    result["state_dict_bitwise"] = sorted(state_dict) == sorted(original) and all(
        torch.equal(state_dict[name], tensor) for name, tensor in original.items())
    result["gather_counts"] = dict(counter.take())
    return result


def _refusals(world_size, mesh, seed):
    """(name, exception type, message) of each bad call, on this rank."""
    from support.dist_utils import error_of
    from torch.distributed.device_mesh import init_device_mesh

    import tpmoe.hf

    errors = {}
    model = _model("qwen3_moe", seed, {})
    model._tp_size = 2  # what transformers' tp_plan loading leaves on a model (with DTensor weights)
    errors["tp_plan"] = error_of(lambda: tpmoe.hf.apply(copy.deepcopy(model), mesh))
    if world_size == 4:
        # The mesh rule (tpmoe.distributed.groups.mesh_dims_by_name): "ep" is EP, another name is left
        # alone (data parallel), so ("ep", "dp") is EP 2 with the experts whole; a 2-D mesh naming
        # neither "ep" nor "tp" says nothing and is refused.
        ep_dp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "dp"))
        errors["ep_dp_report"] = [(entry.shards, entry.ep)
                                  for entry in tpmoe.hf.apply(_model("qwen3_moe", seed, {}), ep_dp)]
        unnamed_roles = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "model"))
        errors["no_role_dim"] = error_of(lambda: tpmoe.hf.apply(_model("qwen3_moe", seed, {}), unnamed_roles))
        wide = init_device_mesh("cpu", (4,), mesh_dim_names=("ep",))
        errors["ep_gt_experts"] = error_of(lambda: tpmoe.hf.apply(_model("qwen3_moe", seed, dict(num_experts=3)),
                                                                  wide))
    return errors


def _ranks(rank, world_size, seed):
    from support.dist_utils import CollectiveCounter
    from torch.distributed.device_mesh import init_device_mesh

    shape, names = ((2,), ("ep",)) if world_size == 2 else ((2, 2), ("ep", "tp"))
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    with CollectiveCounter() as counter:
        results = {family: _case(family, sizes[world_size], seed, mesh, counter) for family, sizes in FAMILIES.items()}
    results["refusals"] = _refusals(world_size, mesh, seed)
    if world_size == 2:
        results["process_group"] = _process_group_case(mesh, seed)
    return results


def _process_group_case(mesh, seed):
    """apply(model, ep_group=ProcessGroup) is the ("ep",) mesh's EP: the same report and logits."""
    import torch.distributed as dist

    import tpmoe.hf

    model = _model("mixtral", seed, {})
    by_mesh, by_group = copy.deepcopy(model), copy.deepcopy(model)
    reports = [tpmoe.hf.apply(by_mesh, mesh), tpmoe.hf.apply(by_group, ep_group=dist.group.WORLD)]
    input_ids = torch.randint(3, VOCAB, (1 + dist.get_rank(), SEQUENCE_LENGTH),
                              generator=torch.Generator().manual_seed(seed + dist.get_rank()))
    with torch.no_grad():
        same = torch.equal(by_mesh(input_ids).logits, by_group(input_ids).logits)
    return dict(same_logits=same, reports=[[(e.ep, e.experts) for e in report] for report in reports])


@pytest.fixture(scope="module")
def spawns(request):
    """Both tests' ranks, one spawn per world size (2, 4), each with its own test's seed."""
    from support.hf_families import supported_keys

    module = request.node.nodeid
    cases = {}
    for world_size in (2, 4):
        seed = seed_of(f"{module}::test_hf_apply_expert_parallel_matches_one_process[{world_size}]")
        cases[f"families at world {world_size}"] = (world_size, _ranks, (seed,))
        seed = seed_of(f"{module}::test_every_supported_block_expert_parallel[{world_size}]")
        cases[f"every block at world {world_size}"] = (world_size, _block_ranks, (seed, supported_keys()))
    # 600 s: the every-block case's own (every supported block built and run between collectives).
    return SharedSpawns(cases, timeout_s=600)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_hf_apply_expert_parallel_matches_one_process(world_size, spawns):
    from tpmoe.distributed.counting import ALL_GATHER

    tp_size = 1 if world_size == 2 else 2
    per_rank = spawns.results(f"families at world {world_size}")
    for family in FAMILIES:
        for rank, results in enumerate(per_rank):
            result = results[family]
            ep_rank, tp_rank = result["where"]
            where = f"{family}, rank {rank} of {world_size} (EP rank {ep_rank}, TP rank {tp_rank})"
            assert not result["missing"], f"{where}: gradients on one side only: {result['missing']}"
            assert not result["vacuous"], f"{where}: zero reference gradients (vacuous): {result['vacuous']}"
            assert result["compared"] > 10, f"{where}: only {result['compared']} comparisons"
            for name, error in result["errors"].items():
                assert error <= FP64_RTOL, f"{where}: {name} max relative error {error:.3e} > {FP64_RTOL:.0e}"
            for entry, expected_experts in zip(result["report"], result["expected_experts"]):
                mode, shards, ep, experts, *_, source = entry
                assert shards == (tp_rank, tp_size) and ep == (ep_rank, 2) and source == "full", (where, entry)
                assert experts == expected_experts, (where, entry)
            assert "experts" in result["table"] and f"{ep_rank}/2" in result["table"], result["table"]
            expected_modes = {"experts"} if family == "granitemoeshared" else {"block"}
            assert {entry[0] for entry in result["report"]} == expected_modes, (where, result["report"])
            tp_counts = {"all_reduce": 1} if tp_size > 1 else {}
            for name in result["forward"]:
                assert result["forward"][name] == [3 + sum(tp_counts.values())], (where, name, result["forward"])
                assert result["backward"][name] == [2 + sum(tp_counts.values())], (where, name, result["backward"])
            # The step: ONE all-reduce of the blocks' replicated grads (none in experts mode without
            # biases: the router is the family's own) + ONE of the data-parallel rest.
            assert result["block_summed"] > 0 or family == "granitemoeshared", where
            assert result["step"] == {"all_reduce": 1 + (result["block_summed"] > 0)}, (where, result["step"])
            assert result["state_dict_bitwise"], f"{where}: gather_state_dict is not HF's state dict bit for bit"
            blocks = len(result["report"])
            assert result["gather_counts"] == {ALL_GATHER: blocks * (1 + (tp_size > 1))}, \
                (where, result["gather_counts"])
        if family == "qwen3_moe":
            ranges = sorted({r[family]["report"][0][3] for r in per_rank})
            assert ranges == [(0, 4), (4, 3)], ranges  # E = 7: uneven
            if tp_size > 1:
                assert sorted({r[family]["report"][0][5] for r in per_rank}) == [4, 5]  # I = 9 over TP 2
    for rank, results in enumerate(per_rank):
        if world_size == 2:
            case = results["process_group"]
            assert case["same_logits"] and case["reports"][0] == case["reports"][1], case
            assert case["reports"][0][0] == ((rank, 2), (4 * rank, 4)), case
        refusals = results["refusals"]
        kind, message = refusals["tp_plan"]
        assert kind == "ValueError" and "tp_plan" in message and "without tp_plan" in message, message
        if world_size == 4:
            assert refusals["ep_dp_report"] and all(entry == ((0, 1), (rank // 2, 2))
                                                    for entry in refusals["ep_dp_report"]), refusals["ep_dp_report"]
            kind, message = refusals["no_role_dim"]
            assert kind == "ValueError" and "tp_mesh_dim" in message and "('dp', 'model')" in message, message
            kind, message = refusals["ep_gt_experts"]
            assert kind == "ValueError" and "4 ranks" in message and "3 routed experts" in message, message


@pytest.mark.distributed
def test_cli_bench_ep_smoke(tmp_path):
    """`tpmoe bench --ep 2` on a tiny preset: EP 2, TP 2 and one process timed interleaved, the
    ratios printed, the bytes of each collective in the JSON, equal to the formula."""
    import os
    import subprocess
    import sys

    # This checkout's tpmoe, whatever an installed one points at (as tests/cli/test_cli.py runs it).
    from support import ROOT as root
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    json_path = tmp_path / "bench.json"
    command = [sys.executable, "-m", "tpmoe", "bench", "--preset", "tiny", "--ep", "2",
               "--world-size", "2", "--tokens", "1,7", "--mode", "train", "--repeats", "1", "--warmup", "0",
               "--threads", "1", "--json", str(json_path)]
    plot_path = tmp_path / "ep.png"
    if importlib.util.find_spec("matplotlib") is not None:
        command += ["--plot", str(plot_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=root, env=env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "vs P=1" in completed.stdout and "ep 2" in completed.stdout, completed.stdout
    payload = json.loads(json_path.read_text())
    rows = payload["rows"]
    layouts = {(row["layout"], row["tokens"]) for row in rows}
    assert layouts == {(layout, t) for layout in ("one process", "tp 2", "ep 2") for t in (1, 7)}, layouts
    for row in rows:
        assert row["median_ms"] > 0 and row["ratio_vs_one_process"] > 0, row
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["samples"] == 1, row
        assert row["flags"] == [], row  # one sample: no spread to call wide, no yardstick to beat
        if row["layout"] == "ep 2":
            assert row["bytes_per_collective"]["all_to_all_single"] > 0, row
        if row["layout"] == "tp 2":
            assert set(row["bytes_per_collective"]) == {"all_reduce"}, row
        # benchmarks/RESULTS.md's claim: every measured figure equals the formula (bench_ep.formula_bytes),
        # collective by collective, at T = 1 and at T = 7.
        assert row["bytes_per_collective"] == row["formula_bytes_per_collective"], row
    if "--plot" in command:
        assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {plot_path}" in completed.stdout


def _block_case(key, seed, mesh):
    """One supported block (tests/support/hf_families.py builds it tiny, fp32) at EP 2: this EP rank's
    rows of a global [3, 5, H] batch against transformers' block over all of it."""
    import torch.distributed as dist

    from support.hf_families import (DECODER_LAYERS, HIDDEN, _layer_arguments, _output, expected_local_grads,
                                     local_grad, make_family_block)

    import tpmoe.hf
    from tpmoe.distributed import allreduce_gradients, allreduce_router_grads

    ep_group = mesh.get_group("ep")
    ep_rank, ep_size = dist.get_rank(ep_group), dist.get_world_size(ep_group)
    tp_group = mesh.get_group("tp") if "tp" in mesh.mesh_dim_names else None
    tp_rank, tp_size = (dist.get_rank(tp_group), dist.get_world_size(tp_group)) if tp_group else (0, 1)
    generator = torch.Generator().manual_seed(seed + 1)
    batch = sum(SEQUENCES_PER_EP_RANK)
    x = torch.randn(batch, SEQUENCE_LENGTH, HIDDEN, generator=generator)
    first = sum(SEQUENCES_PER_EP_RANK[:ep_rank])
    mine = slice(first, first + SEQUENCES_PER_EP_RANK[ep_rank])
    reference = make_family_block(key, seed)
    swapped = copy.deepcopy(reference)
    report = tpmoe.hf.apply(swapped, mesh)

    def run(holder, inputs, dy=None):
        leaf = inputs.clone().requires_grad_(True)
        arguments = _layer_arguments(holder.mlp, tuple(inputs.shape[:2])) if key in DECODER_LAYERS else {}
        y = _output(holder.mlp(leaf.clone(), **arguments))
        dy = torch.randn(y.shape, generator=generator) if dy is None else dy
        y.backward(dy)
        return y.detach(), leaf.grad, dy

    def rows_of(tensor):
        # This rank's sequences of a block output, whatever its leading dims ([B, S, H], the flat
        # [T, H] of Llama-4, Ernie-4.5-VL's flat [T * H]): the batch is the outermost.
        return tensor.reshape(batch, -1)[mine].reshape((-1,) + tuple(tensor.shape[1:]))

    y_ref, dx_ref, dy = run(reference, x)
    grads_ref = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    y, dx, _ = run(swapped, x[mine], rows_of(dy))
    allreduce_router_grads(swapped)
    allreduce_gradients(tpmoe.hf.data_parallel_parameters(swapped), ep_group, kind="EP")
    errors = {"output": _error(y, rows_of(y_ref)), "input grad": _error(dx, dx_ref[mine])}
    missing, vacuous = [], []
    for name, grad in expected_local_grads(reference, grads_ref, swapped, tp_rank, tp_size, ep_rank=ep_rank,
                                           ep_size=ep_size).items():
        got = swapped.get_parameter(name).grad
        got = None if got is None else local_grad(got)
        if grad is None or got is None:
            if (grad is None) != (got is None):
                missing.append(name)
            continue
        if grad.numel() and grad.abs().max() == 0:
            vacuous.append(name)
        errors[name] = _error(got, grad)
    state = tpmoe.hf.gather_state_dict(swapped)
    original = reference.state_dict()
    bitwise = sorted(state) == sorted(original) and all(torch.equal(state[n], t) for n, t in original.items())
    return dict(errors=errors, missing=missing, vacuous=vacuous, bitwise=bitwise,
                modes=sorted({e.mode for e in report}), experts=[e.experts for e in report])


def _block_ranks(rank, world_size, seed, keys):
    from torch.distributed.device_mesh import init_device_mesh

    shape, names = ((2,), ("ep",)) if world_size == 2 else ((2, 2), ("ep", "tp"))
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    results = {}
    for key in keys:
        try:
            results[key] = _block_case(key, seed, mesh)
        except Exception as error:  # reported per key: one family's failure must not hide the others'
            import traceback
            results[key] = dict(exception=f"{type(error).__name__}: {error}\n{traceback.format_exc()[-1500:]}")
    return results


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_every_supported_block_expert_parallel(world_size, spawns):
    """Every supported block of the snapshot at EP 2 and EP 2 x TP 2 (fp32, 1e-5 relative): output,
    input grad, every parameter gradient after the per-step sums, gather_state_dict bit for bit."""
    from support.hf_families import supported_keys
    from support.tolerances import FP32_RTOL

    keys = supported_keys()
    per_rank = spawns.results(f"every block at world {world_size}")
    failures = []
    for key in keys:
        for rank, results in enumerate(per_rank):
            result = results[key]
            where = f"{key}, rank {rank} of {world_size}"
            if "exception" in result:
                failures.append(f"{where}: {result['exception']}")
                continue
            bad = {name: error for name, error in result["errors"].items() if error > FP32_RTOL}
            if bad or result["missing"] or result["vacuous"] or not result["bitwise"]:
                failures.append(f"{where}: errors {bad}, missing {result['missing']}, vacuous {result['vacuous']}, "
                                f"bitwise {result['bitwise']}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
