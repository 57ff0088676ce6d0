"""Bad input to the tensor-parallel block: each a clear error naming what was wrong.

The distributed cases run in ONE spawn of 3 gloo ranks; each rank records the exception it
got (type and message) and the parent asserts on them. The same spawn checks how the TP group
is given: a 1-D DeviceMesh, the named dimension of a 2-D one (and the error without the name).
"""
import dataclasses

import pytest
import torch

from support.dist_utils import ALL_GATHER, REDUCE_SCATTER, error_of, run_distributed
from tpmoe import MoEConfig, random_moe_weights
from tpmoe.block import MoEBlock
from tpmoe.sharding import shard_moe_weights, shard_sizes

CONFIG = MoEConfig(hidden_size=8, intermediate_size=6, num_experts=4, top_k=2, shared_intermediate_size=3,
                   shared_expert_gate=True)


def test_weights_not_matching_the_config():
    weights = random_moe_weights(CONFIG)
    weights["w_down"] = weights["w_down"][:, :, :5]
    with pytest.raises(ValueError, match=r"weights\['w_down'\]: expected shape \(4, 8, 6\), got \(4, 8, 5\)"):
        MoEBlock.from_full(CONFIG, weights)
    weights = random_moe_weights(CONFIG)
    del weights["shared_gate"]
    with pytest.raises(ValueError, match=r"missing 'shared_gate'"):
        MoEBlock.from_full(CONFIG, weights)
    weights = random_moe_weights(CONFIG)
    weights["b_down"] = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"unexpected entries \['b_down'\]"):
        MoEBlock.from_full(CONFIG, weights)


def test_bad_arguments_in_one_process():
    block = MoEBlock(CONFIG)
    with pytest.raises(ValueError, match=r"hidden_states: expected shape \[\.\.\., 8\].*got \(3, 7\)"):
        block(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"tokens_per_rank: only used in sequence-parallel mode"):
        block(torch.randn(3, 8), tokens_per_rank=[3])
    with pytest.raises(TypeError, match=r"config: expected a tpmoe.MoEConfig, got dict"):
        MoEBlock(dataclasses.asdict(CONFIG))
    with pytest.raises(TypeError, match=r"group: expected a torch.distributed ProcessGroup, a DeviceMesh or None, "
                                        r"got int"):
        MoEBlock(CONFIG, group=2)
    with pytest.raises(ValueError, match=r"world_size: expected a positive int, got 0"):
        shard_sizes(6, 0)
    with pytest.raises(ValueError, match=r"shard_unit: expected a positive int"):
        MoEBlock(CONFIG, shard_unit=0)


def _distributed_errors(rank, world_size):
    import torch.distributed as dist

    from support.dist_utils import CollectiveCounter

    group = dist.group.WORLD
    weights = random_moe_weights(CONFIG, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, CONFIG.hidden_size, generator=torch.Generator().manual_seed(1))
    results = {}

    # Shards cut for a TP group of 6 loaded on this group of 3.
    shards_for_six = shard_moe_weights(CONFIG, weights, rank, 6)
    results["shards_for_another_world_size"] = error_of(
        lambda: MoEBlock.from_shards(CONFIG, shards_for_six, group=group))
    bad = dict(weights, w_gate_up=weights["w_gate_up"][:, :-1])
    results["full_weights_not_matching"] = error_of(lambda: MoEBlock.from_full(CONFIG, bad, group=group))

    # check_replicated: agreeing ranks pass with one extra all-gather; a differing rank is named on all ranks.
    block = MoEBlock.from_full(CONFIG, weights, group=group, check_replicated=True)
    with CollectiveCounter() as counter:
        block(x)
    results["check_counts"] = dict(counter.counts)
    x_rank2_differs = x.clone()
    if rank == 2:
        x_rank2_differs[4, 7] += 1e-6
    results["input_differs"] = error_of(lambda: block(x_rank2_differs))
    diverged = MoEBlock.from_full(CONFIG, weights, group=group, check_replicated=True)
    if rank == 1:
        with torch.no_grad():
            diverged.router_weight[0, 0] += 0.5  # a replica that drifted: same input, other routing
    results["routing_differs"] = error_of(lambda: diverged(x))

    # Sequence-parallel token counts that cannot be right.
    sp_block = MoEBlock.from_full(CONFIG, weights, group=group, sequence_parallel=True)
    results["tokens_per_rank_length"] = error_of(lambda: sp_block(x[:2], tokens_per_rank=[2, 2]))
    results["tokens_per_rank_entry"] = error_of(lambda: sp_block(x[:2], tokens_per_rank=[3, 3, 3]))
    # check_replicated in sequence-parallel mode: uneven counts without tokens_per_rank (which
    # would otherwise fail inside the all-gather or hang), and a drifted replicated weight.
    sp_checked = MoEBlock.from_full(CONFIG, weights, group=group, sequence_parallel=True, check_replicated=True)
    local_tokens = 2 if rank == 1 else 1
    results["sp_uneven_without_counts"] = error_of(lambda: sp_checked(x[:local_tokens]))
    with CollectiveCounter() as counter:
        sp_checked(x[:local_tokens], tokens_per_rank=[1, 2, 1])  # the same counts, declared: fine
    results["sp_check_counts"] = dict(counter.counts)
    if rank == 2:
        with torch.no_grad():
            sp_checked.shared_gate[0, 3] += 1e-3
    results["sp_weight_differs"] = error_of(lambda: sp_checked(x[:2]))

    # The TP group from a DeviceMesh: the same block, bitwise the same output.
    from torch.distributed.device_mesh import init_device_mesh
    reference = MoEBlock.from_full(CONFIG, weights, group=group)(x)
    mesh_1d = init_device_mesh("cpu", (3,), mesh_dim_names=("tp",))
    results["mesh_1d_equal"] = torch.equal(MoEBlock.from_full(CONFIG, weights, group=mesh_1d)(x), reference)
    mesh_2d = init_device_mesh("cpu", (1, 3), mesh_dim_names=("dp", "tp"))
    results["mesh_2d_equal"] = torch.equal(
        MoEBlock.from_full(CONFIG, weights, group=mesh_2d, tp_mesh_dim="tp")(x), reference)
    # The mesh rule (tpmoe.distributed.groups.mesh_dims_by_name): a dimension named "tp" is the TP
    # group without tp_mesh_dim; a 2-D mesh naming neither "tp" nor "ep" needs the keyword.
    results["mesh_2d_by_name_equal"] = torch.equal(MoEBlock.from_full(CONFIG, weights, group=mesh_2d)(x), reference)
    mesh_2d_unnamed_roles = init_device_mesh("cpu", (1, 3), mesh_dim_names=("dp", "model"))
    results["mesh_2d_without_dim"] = error_of(lambda: MoEBlock.from_full(CONFIG, weights,
                                                                         group=mesh_2d_unnamed_roles))
    return results


@pytest.mark.distributed
def test_errors_in_spawned_ranks():
    per_rank = run_distributed(_distributed_errors, 3)
    for rank, results in enumerate(per_rank):
        kind, message = results["shards_for_another_world_size"]
        assert kind == "ValueError" and f"rank {rank} of a TP group of world size 3" in message \
            and "another world size" in message, message
        kind, message = results["full_weights_not_matching"]
        assert kind == "ValueError" and "weights['w_gate_up']: expected shape (4, 12, 8), got (4, 11, 8)" in message, \
            message
        assert results["check_counts"] == {"all_reduce": 1, ALL_GATHER: 1}, results["check_counts"]
        kind, message = results["input_differs"]
        assert kind == "ValueError" and "hidden_states on rank 2 of the TP group differs from rank 0" in message, \
            message
        kind, message = results["routing_differs"]
        assert kind == "ValueError" and "on rank 1 of the TP group differs from rank 0" in message, message
        assert "topk_" in message, message
        kind, message = results["tokens_per_rank_length"]
        assert kind == "ValueError" and "tokens_per_rank: expected 3 non-negative ints" in message, message
        kind, message = results["tokens_per_rank_entry"]
        assert kind == "ValueError" and f"entry {rank} (this rank) is 3 but this rank holds 2 tokens" in message, \
            message
        kind, message = results["sp_uneven_without_counts"]
        assert kind == "ValueError" and "rank 1 of the TP group holds 2 tokens but rank 0 holds 1; uneven counts " \
            "need tokens_per_rank=[1, 2, 1]" in message, message
        assert results["sp_check_counts"] == {ALL_GATHER: 2, REDUCE_SCATTER: 1}, results["sp_check_counts"]
        kind, message = results["sp_weight_differs"]
        assert kind == "ValueError" and "shared_gate on rank 2 of the TP group differs from rank 0" in message, message
        assert results["mesh_1d_equal"] and results["mesh_2d_equal"] and results["mesh_2d_by_name_equal"]
        kind, message = results["mesh_2d_without_dim"]
        assert kind == "ValueError" and "tp_mesh_dim: the DeviceMesh has 2 dimensions" in message, message


def test_a_taken_port_is_retried_on_a_new_one():
    """The spawners' port retry (tpmoe.distributed.groups.run_on_free_port): a run that fails
    with "address already in use" gets a fresh port; any other failure, a failure of another
    type, and the last attempt's failure reach the caller unchanged."""
    from tpmoe.distributed.groups import run_on_free_port

    def run_failing(times, error):
        ports = []

        def run(port):
            ports.append(port)
            if len(ports) <= times:
                raise error
            return "ran"
        return run, ports

    run, ports = run_failing(2, AssertionError("rank 0: RuntimeError: Address already in use"))
    assert run_on_free_port(run, AssertionError) == "ran" and len(ports) == 3
    assert all(isinstance(port, int) and 0 < port < 65536 for port in ports)

    run, ports = run_failing(3, AssertionError("rank 0: RuntimeError: Address already in use"))
    with pytest.raises(AssertionError, match="Address already in use"):
        run_on_free_port(run, AssertionError)
    assert len(ports) == 3

    for error in (AssertionError("rank 1: ValueError: something else"), RuntimeError("address already in use")):
        run, ports = run_failing(1, error)
        with pytest.raises(type(error), match=str(error)):
            run_on_free_port(run, AssertionError)
        assert len(ports) == 1, error
