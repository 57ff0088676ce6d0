"""tpmoe.sharding, in one process: shard sizes, the slices of every layout, and their inverse.

The decisive check is arithmetic: the partial outputs of the P shards, each run as a block of
its own (tpmoe.reference, float64), must sum to the full block. A naive split of the 2I axis
fails it (tested, so the check is not vacuous).
"""
import dataclasses

import pytest
import torch

from tpmoe import MoEConfig, random_moe_weights
from tpmoe.reference import reference_experts, reference_shared_expert
from tpmoe.sharding import (SHARDED_NAMES, assemble_full, check_shards, shard_moe_weights, shard_range,
                            shard_shapes, shard_sizes)

LAYOUT_CASES = [
    ("concatenated", True), ("concatenated", False), ("interleaved", True), ("interleaved", False),
    ("gpt_oss", True), ("gpt_oss", False),
]


def _config(layout, gated, intermediate_size=7, shared=5):
    return MoEConfig(hidden_size=6, intermediate_size=intermediate_size, num_experts=3, top_k=2, layout=layout,
                     gated=gated, activation="gelu" if not gated else "silu", expert_bias=True,
                     shared_intermediate_size=shared, shared_expert_gate=True)


def _routed_partial(config, weights, x, topk_ids, topk_weights):
    """The routed experts without the down bias (a replicated term, added once after the sum)."""
    return reference_experts(x, weights["w_gate_up"], weights["w_down"], topk_ids, topk_weights,
                             activation=config.activation, layout=config.layout, gated=config.gated,
                             b_gate_up=weights["b_gate_up"])


def _shared_partial(config, weights, x):
    shared_size = weights["shared_down"].shape[1]
    if shared_size == 0:
        return torch.zeros_like(x)
    return reference_shared_expert(x, weights, dataclasses.replace(config, shared_intermediate_size=shared_size))


@pytest.mark.parametrize("shard_unit", [1, 2, 3, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_shard_sizes_are_torch_chunk_sizes(world_size, shard_unit):
    """DTensor's rule for an uneven Shard: torch.chunk of the units (a partial last unit stays with
    its unit), missing chunks empty; contiguous ranges in rank order."""
    for total in range(0, 41):
        sizes = shard_sizes(total, world_size, shard_unit)
        unit_of_column = torch.arange(total) // shard_unit
        chunks = torch.arange(-(-total // shard_unit)).chunk(world_size)
        expected = [int(torch.isin(unit_of_column, chunk).sum()) for chunk in chunks]
        assert sizes == expected + [0] * (world_size - len(expected)), (total, world_size, shard_unit, sizes)
        starts = [shard_range(total, rank, world_size, shard_unit) for rank in range(world_size)]
        assert [stop - start for start, stop in starts] == sizes
        assert all(starts[r][1] == starts[r + 1][0] for r in range(world_size - 1)) and starts[0][0] == 0


def test_shard_sizes_examples():
    assert shard_sizes(77, 2) == [39, 38]
    assert shard_sizes(10, 3) == [4, 4, 2]
    assert shard_sizes(10, 4) == [3, 3, 3, 1]
    assert shard_sizes(2, 4) == [1, 1, 0, 0]  # fewer columns than ranks: empty shards at the end
    assert shard_sizes(130, 2, shard_unit=64) == [128, 2]  # 3 units: 2 and the partial third
    assert shard_sizes(200, 2, shard_unit=64) == [128, 72]
    assert shard_sizes(192, 2, shard_unit=64) == [128, 64]


@pytest.mark.parametrize("layout,gated", LAYOUT_CASES)
@pytest.mark.parametrize("world_size,shard_unit", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 1)])
def test_shards_sum_to_the_full_block(layout, gated, world_size, shard_unit, seed):
    config = _config(layout, gated)
    weights = random_moe_weights(config, dtype=torch.float64)
    x = torch.randn(9, config.hidden_size, dtype=torch.float64)
    topk_ids = torch.stack([torch.randperm(config.num_experts)[:config.top_k] for _ in range(9)])
    topk_weights = torch.rand(9, config.top_k, dtype=torch.float64)
    full_routed = _routed_partial(config, weights, x, topk_ids, topk_weights)
    full_shared = _shared_partial(config, weights, x)

    shards = [shard_moe_weights(config, weights, rank, world_size, shard_unit) for rank in range(world_size)]
    for rank, shard in enumerate(shards):
        assert {name: tuple(t.shape) for name, t in shard.items()} == shard_shapes(config, rank, world_size, shard_unit)
    routed = sum(_routed_partial(config, shard, x, topk_ids, topk_weights) for shard in shards)
    shared = sum(_shared_partial(config, shard, x) for shard in shards)
    torch.testing.assert_close(routed, full_routed, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared, full_shared, rtol=1e-12, atol=1e-12)

    rebuilt = assemble_full(config, shards, shard_unit)
    assert sorted(rebuilt) == sorted(weights)
    for name in weights:
        assert torch.equal(rebuilt[name], weights[name]), f"{name} not rebuilt bitwise"


@pytest.mark.parametrize("layout,gated", [case for case in LAYOUT_CASES if case[1]])
def test_each_rank_gets_matching_gate_and_up_columns(layout, gated):
    config = _config(layout, gated, intermediate_size=10)
    weights = random_moe_weights(config)
    full = weights["w_gate_up"]
    intermediate = config.intermediate_size
    if layout == "concatenated":
        gate, up = full[:, :intermediate], full[:, intermediate:]
    elif layout == "interleaved":
        gate, up = full[:, 0::2], full[:, 1::2]
    else:  # gpt_oss: [E, H, 2I], interleaved along the last axis
        gate, up = full[:, :, 0::2].transpose(1, 2), full[:, :, 1::2].transpose(1, 2)
    for rank in range(3):
        start, stop = shard_range(intermediate, rank, 3)
        shard = shard_moe_weights(config, weights, rank, 3)["w_gate_up"]
        local = stop - start
        if layout == "concatenated":
            shard_gate, shard_up = shard[:, :local], shard[:, local:]
        elif layout == "interleaved":
            shard_gate, shard_up = shard[:, 0::2], shard[:, 1::2]
        else:
            shard_gate, shard_up = shard[:, :, 0::2].transpose(1, 2), shard[:, :, 1::2].transpose(1, 2)
        assert torch.equal(shard_gate, gate[:, start:stop]) and torch.equal(shard_up, up[:, start:stop])


def test_naive_split_of_gate_up_is_caught():
    """Proves the sum check is not vacuous: halving the concatenated 2I axis (rank 0 all gate,
    rank 1 all up) does not sum to the block."""
    config = _config("concatenated", True, intermediate_size=6)
    weights = random_moe_weights(config, dtype=torch.float64)
    x = torch.randn(5, config.hidden_size, dtype=torch.float64)
    topk_ids = torch.tensor([[0, 1]] * 5)
    topk_weights = torch.rand(5, 2, dtype=torch.float64)
    naive = []
    for rank in range(2):
        shard = dict(shard_moe_weights(config, weights, rank, 2))
        shard["w_gate_up"] = weights["w_gate_up"].chunk(2, dim=1)[rank]
        shard["b_gate_up"] = weights["b_gate_up"].chunk(2, dim=1)[rank]
        naive.append(_routed_partial(config, shard, x, topk_ids, topk_weights))
    full = _routed_partial(config, weights, x, topk_ids, topk_weights)
    assert not torch.allclose(naive[0] + naive[1], full, rtol=1e-3, atol=1e-3)


def test_replicated_weights_are_not_sliced():
    config = dataclasses.replace(_config("gpt_oss", True), router_bias=True)
    weights = random_moe_weights(config)
    shard = shard_moe_weights(config, weights, 1, 4)
    for name in set(weights) - set(SHARDED_NAMES):
        assert shard[name] is weights[name], name


def test_check_shards_names_world_size():
    config = _config("concatenated", True)
    weights = random_moe_weights(config)
    shard_for_four = shard_moe_weights(config, weights, 1, 4)
    with pytest.raises(ValueError, match=r"w_gate_up.*rank 1 of a TP group of world size 2.*another world size"):
        check_shards(config, shard_for_four, 1, 2)
