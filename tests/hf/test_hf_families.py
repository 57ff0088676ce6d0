"""Every MoE block of the pinned transformers release: judged, pinned, and run against transformers.

- The installed transformers is the release tools/ensure_deps.py pins (a stale pin shows here).
- tpmoe/hf/families_snapshot.json is exactly the judgement of the installed code, supported and
  refused lists both (`python -m tpmoe.hf.families --write` rewrites it), and refusals are only
  of the kinds a user can act on.
- Each supported block (tests/support/hf_families.py builds it tiny from its own config class) swapped by
  tpmoe.hf.apply gives transformers' output, input gradient and every parameter gradient
  (fp32, 1e-5 relative; zero reference gradients are refused as vacuous) in one process, and at
  world size 2 and 3 (gloo; I = 10 splits 5/5 and 4/3/3, the shared 14 as 7/7 and 5/5/4) with
  ONE collective forward and ONE backward per block, and gather_state_dict giving back the
  block's state dict bit for bit.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="tpmoe.hf needs transformers (pip install -e .[hf])")

from support import seed_of  # noqa: E402
from support.dist_utils import SharedSpawns  # noqa: E402
from support.hf_families import compare, installed, supported_keys  # noqa: E402
from support.tolerances import FP32_RTOL  # noqa: E402

from tpmoe.sharding import shard_sizes  # noqa: E402
from support import ROOT  # noqa: E402

KEYS = supported_keys()


def _pinned_versions():
    path = Path(ROOT) / "tools" / "ensure_deps.py"
    spec = importlib.util.spec_from_file_location("ensure_deps", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TEST


def test_installed_transformers_is_the_pinned_release():
    pinned = _pinned_versions()["transformers"]
    assert transformers.__version__ == pinned, (
        f"transformers {transformers.__version__} is installed, tools/ensure_deps.py pins {pinned}: move the pin "
        f"(and rewrite the snapshot with `python -m tpmoe.hf.families --write`) or install the pinned release")


@pytest.mark.slow
def test_snapshot_is_the_judgement_of_the_installed_release():
    from tpmoe.hf.families import current_snapshot, load_snapshot

    recorded, current = load_snapshot(), current_snapshot()
    assert recorded["transformers"] == transformers.__version__
    assert recorded["supported"] == current["supported"], "supported list changed: python -m tpmoe.hf.families --write"
    assert recorded["rejected"] == current["rejected"], "rejected list changed: python -m tpmoe.hf.families --write"


def test_refusals_are_only_what_is_no_routed_expert_block_here():
    """Each refused block is either no routed-experts block in tpmoe's sense (registry
    NOT_EXPERT_BLOCKS) or has experts whose code tpmoe has not verified, and says which."""
    from tpmoe.hf.families import load_snapshot
    from tpmoe.hf.registry import NOT_EXPERT_BLOCKS

    rejected = load_snapshot()["rejected"]
    assert rejected, "an empty refusal list would make this test vacuous"
    for key, reason in rejected.items():
        assert key in NOT_EXPERT_BLOCKS or reason.startswith("experts "), (key, reason)
    # The families the adapter runs today, at least (a shrinking list is a regression).
    supported = load_snapshot()["supported"]
    assert len(supported) >= 75, len(supported)
    for key in ("qwen2_moe.Qwen2MoeSparseMoeBlock", "deepseek_v3.DeepseekV3MoE", "gpt_oss.GptOssMLP",
                "mixtral.MixtralSparseMoeBlock", "granitemoe.GraniteMoeMoE", "phimoe.PhimoeSparseMoeBlock",
                "gemma4.Gemma4TextDecoderLayer", "mistral4.Mistral4MoE", "llama4.Llama4TextMoe", "dbrx.DbrxFFN",
                "longcat_flash.LongcatFlashMoE", "muse_spark.MuseSparkMoE", "jetmoe.JetMoeMoE"):
        assert key in supported, key


def test_every_config_family_has_one_block_and_a_line_of_test_sizes():
    """registry CONFIGS: each family builds its one BLOCKS class, has its tiny sizes in
    tests/support/hf_models.py, and reads back, off the block built, the MoEConfig written into its config."""
    from support.hf_models import TINY_CONFIGS, make_hf_block

    from tpmoe.hf.configs import FAMILIES, block_class, config_class, hf_config_kwargs, moe_config_from_hf
    from tpmoe.hf.registry import BLOCKS

    assert sorted(TINY_CONFIGS) == sorted(FAMILIES)
    for family in FAMILIES:
        assert block_class(family).__name__ in {block.class_name for block in BLOCKS if block.family == family}
        _, config, _ = make_hf_block(family)
        assert moe_config_from_hf(family, config_class(family)(**hf_config_kwargs(family, config))) == config


def test_a_config_the_family_cannot_describe_is_refused_by_name():
    import dataclasses

    from tpmoe.cli.hf_blocks import HFUnavailable, make_hf_block
    from tpmoe.hf.configs import Inexpressible, hf_config_kwargs, meta_block
    from tpmoe.presets import preset_config

    config = preset_config("mixtral-8x7b", 1 / 64)
    # Mixtral always renormalises: no config field says otherwise.
    with pytest.raises(Inexpressible, match="MixtralSparseMoeBlock computes another block: renormalize=True, not "):
        meta_block("mixtral", dataclasses.replace(config, renormalize=False))
    with pytest.raises(Inexpressible, match="activation 'relu2' has no transformers name"):
        hf_config_kwargs("qwen3_moe", dataclasses.replace(config, activation="relu2"))
    with pytest.raises(HFUnavailable, match=r"family: expected one of qwen3_moe, .*, got 'llama'"):
        make_hf_block("llama", config, {}, "eager", trainable=False)


def _assert_matches(key: str, result: dict, where: str) -> None:
    assert not result["missing"], f"{where}: gradients present on one side only: {result['missing']}"
    assert not result["vacuous"], f"{where}: zero reference gradients (vacuous): {result['vacuous']}"
    assert result["compared"] >= 4, f"{where}: only {result['compared']} comparisons"
    for name, error in result["errors"].items():
        assert error <= FP32_RTOL, f"{where}: {name} max relative error {error:.3e} > {FP32_RTOL:.0e}"
    assert result["bitwise"], f"{where}: gather_state_dict is not the block's state dict bit for bit"


@pytest.mark.parametrize("key", KEYS)
def test_block_matches_transformers(key, seed):
    if not installed(key):
        pytest.skip(f"{key}: not in transformers {transformers.__version__} (a family of the pinned release)")
    result = compare(key, seed)
    _assert_matches(key, result, key)
    mode, pattern, router, shards, *_ = result["report"][0]
    assert shards == (0, 1) and mode in ("block", "experts"), result["report"]


def _ranks(rank, world_size, seed, keys):
    import torch.distributed as dist

    from support.dist_utils import CollectiveCounter

    torch.set_num_threads(1)
    with CollectiveCounter() as counter:
        return {key: compare(key, seed, dist.group.WORLD, rank, world_size, counter) for key in keys}


RANDOM_DRAW_KEYS = ["phimoe.PhimoeSparseMoeBlock", "minimax_m2.MiniMaxM2SparseMoeBlock"]


@pytest.fixture(scope="module")
def spawns(request):
    """The distributed tests' ranks, one spawn per world size (2, 3), each case with its own test's
    seed, in the tests' order."""
    module = request.node.nodeid
    keys = [key for key in KEYS if installed(key)]
    cases = {f"blocks at world {world_size}": (world_size, _ranks, (
        seed_of(f"{module}::test_blocks_tensor_parallel[{world_size}]"), keys)) for world_size in (2, 3)}
    cases["random draws"] = (2, _training_ranks, (
        seed_of(f"{module}::test_random_draws_inside_blocks_agree_across_ranks"), RANDOM_DRAW_KEYS))
    return SharedSpawns(cases, timeout_s=300)  # the blocks cases' own (every block between collectives)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_blocks_tensor_parallel(world_size, spawns):
    keys = [key for key in KEYS if installed(key)]
    per_rank = spawns.results(f"blocks at world {world_size}")
    for key in keys:
        for rank, results in enumerate(per_rank):
            result = results[key]
            where = f"{key}, rank {rank} of {world_size}"
            _assert_matches(key, result, where)
            mode, pattern, router, shards, I_local, intermediate, source = result["report"][0]
            assert shards == (rank, world_size) and source == "full", where
            assert I_local == shard_sizes(intermediate, world_size)[rank], (where, I_local, intermediate)
            assert result["collectives"] == {"forward": [1], "backward": [1]}, (where, result["collectives"])


def _training_ranks(rank, world_size, seed, keys):
    """Training mode, where these blocks draw random numbers (jitter, sparse-mixer sampling): each
    rank's output against transformers' block run with the global RNG seeded as tpmoe seeds it."""
    import copy

    import torch.distributed as dist

    import tpmoe.hf
    from support.hf_families import make_family_block, run_block
    from support.tolerances import max_rel_error
    from tpmoe.hf.module import jitter_generator_seed

    results = {}
    for key in keys:
        reference = make_family_block(key, seed).train()
        swapped = copy.deepcopy(reference)
        report = tpmoe.hf.apply(swapped, dist.group.WORLD, jitter_seed=seed)
        torch.manual_seed(jitter_generator_seed(seed, 0, report[0].layer))
        y_ref, dx_ref, _ = run_block(reference, seed)
        torch.manual_seed(1000 + rank)  # each rank's own RNG differs: tpmoe must not depend on it
        y, dx, _ = run_block(swapped, seed)
        results[key] = dict(output=max_rel_error(y, y_ref), input_grad=max_rel_error(dx, dx_ref),
                            mode=report[0].mode, unseeded=max_rel_error(run_block(reference, seed)[0], y_ref))
    return results


@pytest.mark.distributed
def test_random_draws_inside_blocks_agree_across_ranks(spawns):
    """A block kept in experts mode draws its randomness (here Phi-MoE's sparse-mixer sampling and
    input jitter, MiniMax-M2's jitter) from the global RNG, re-seeded from (jitter_seed, step,
    layer) on every rank alike; without that the ranks would route differently."""
    keys = RANDOM_DRAW_KEYS
    per_rank = spawns.results("random draws")
    for key in keys:
        for rank, result in enumerate(per_rank):
            assert result[key]["mode"] == "experts", result[key]
            assert result[key]["output"] <= FP32_RTOL and result[key]["input_grad"] <= FP32_RTOL, (key, rank, result)
            # The draws matter: the same block with other random numbers gives another output.
            assert result[key]["unseeded"] > 1e-3, (key, result[key])
