"""Bad input to the expert-parallel block: a clear error on EVERY rank, and no rank left waiting.

ONE spawn of 4 gloo ranks; each rank records the exception it got (type and message) and the
parent asserts on all of them. Errors found before any collective (a mesh without the named
dimension, an EP group larger than E, overlapping groups) are raised alike by every rank; the
ones only some ranks can see (one rank's shards, TP groups of different sizes) travel through
the construction-time agreement (tpmoe.distributed.check_expert_parallel_agree) so that the
other ranks raise too. The spawn ends with a good block's forward on the same groups: the
errors left nothing half-done.
"""
import pytest
import torch

from support.dist_utils import (ALL_GATHER, PROCESS_GROUP_TIMEOUT_S, error_of, group_timeout_s, new_group,
                                run_distributed)
from tpmoe import MoEConfig, random_moe_weights

CONFIG = MoEConfig(hidden_size=8, intermediate_size=6, num_experts=7, top_k=2, shared_intermediate_size=3)


def _distributed_errors(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tpmoe.block import MoEBlock
    from tpmoe.sharding import shard_moe_weights

    weights = random_moe_weights(CONFIG, generator=torch.Generator().manual_seed(0))
    results = {}
    mesh_dp_tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    mesh_ep = init_device_mesh("cpu", (4,), mesh_dim_names=("ep",))
    mesh_ep_tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "tp"))
    results["mesh_without_ep"] = error_of(
        lambda: MoEBlock.from_full(CONFIG, weights, mesh_dp_tp, ep_mesh_dim="ep", tp_mesh_dim="tp"))
    results["mesh_without_tp"] = error_of(
        lambda: MoEBlock.from_full(CONFIG, weights, mesh_ep, ep_mesh_dim="ep", tp_mesh_dim="tp"))
    results["same_dim"] = error_of(lambda: MoEBlock(CONFIG, mesh_ep_tp, ep_mesh_dim="ep", tp_mesh_dim="ep"))
    three_experts = MoEConfig(hidden_size=8, intermediate_size=6, num_experts=3, top_k=2)
    results["ep_larger_than_e_from_full"] = error_of(lambda: MoEBlock.from_full(
        three_experts, random_moe_weights(three_experts), mesh_ep, ep_mesh_dim="ep"))
    results["ep_larger_than_e_seeded"] = error_of(lambda: MoEBlock(three_experts, mesh_ep, ep_mesh_dim="ep"))
    results["ep_dim_with_process_group"] = error_of(lambda: MoEBlock(CONFIG, dist.group.WORLD, ep_mesh_dim="ep"))
    results["ep_group_not_a_group"] = error_of(lambda: MoEBlock(CONFIG, ep_group=3))
    results["ep_group_with_mesh"] = error_of(lambda: MoEBlock(CONFIG, mesh_ep_tp, ep_group=dist.group.WORLD))
    results["sequence_parallel"] = error_of(
        lambda: MoEBlock(CONFIG, mesh_ep_tp, ep_mesh_dim="ep", tp_mesh_dim="tp", sequence_parallel=True))

    # Plain groups. Every rank creates every group, in the same order (torch.distributed's rule).
    pairs = [new_group([0, 1]), new_group([2, 3])]
    results["overlapping_groups"] = error_of(
        lambda: MoEBlock.from_full(CONFIG, weights, group=pairs[rank // 2], ep_group=dist.group.WORLD))
    # TP groups {0, 1}, {2}, {3} under EP groups {0, 2}, {1, 3}: ranks 2 and 3 think their TP group
    # has one rank, rank 0 and 1 that theirs has two; only the EP groups' gathers can tell.
    singles = {2: new_group([2]), 3: new_group([3])}
    ep_groups = [new_group([0, 2]), new_group([1, 3])]
    mine = [group for group in pairs + ep_groups + list(singles.values()) if isinstance(group, dist.ProcessGroup)]
    results["group_timeouts"] = sorted({group_timeout_s(group) for group in mine})
    tp_group = pairs[0] if rank < 2 else singles[rank]
    results["mismatched_tp_sizes"] = error_of(
        lambda: MoEBlock.from_full(CONFIG, weights, group=tp_group, ep_group=ep_groups[rank % 2]))

    # One rank's shards: rank 3 (EP rank 1, TP rank 1) loads the shards of EP rank 0 (4 experts, not 3).
    ep_rank, tp_rank = divmod(rank, 2)
    shards = shard_moe_weights(CONFIG, weights, tp_rank, 2, ep_rank=0 if rank == 3 else ep_rank, ep_size=2)
    results["one_rank_bad_shards"] = error_of(
        lambda: MoEBlock.from_shards(CONFIG, shards, mesh_ep_tp, ep_mesh_dim="ep", tp_mesh_dim="tp"))

    # Afterwards the same groups still run a good block (on tokens shared by each TP pair).
    block = MoEBlock.from_full(CONFIG, weights, mesh_ep_tp, ep_mesh_dim="ep", tp_mesh_dim="tp")
    x = torch.randn(3, CONFIG.hidden_size, generator=torch.Generator().manual_seed(ep_rank))
    results["good_block_after"] = tuple(block(x).shape)

    # check_replicated=True: within each TP group the tokens and routing, over each EP group the
    # replicated weights. The faults hit every TP group (or every EP group), so that every rank raises.
    from support.dist_utils import CollectiveCounter
    checked = MoEBlock.from_full(CONFIG, weights, mesh_ep_tp, ep_mesh_dim="ep", tp_mesh_dim="tp",
                                 check_replicated=True)
    with CollectiveCounter() as counter:
        checked(x)
    results["check_counts"] = dict(counter.counts)
    x_differs = x.clone()
    if tp_rank == 1:
        x_differs[2, 5] += 1e-6
    results["tokens_differ_in_tp_group"] = error_of(lambda: checked(x_differs))
    if ep_rank == 1:
        with torch.no_grad():
            checked.router_weight[0, 0] += 0.5
    results["router_differs_in_ep_group"] = error_of(lambda: checked(x))
    return results


@pytest.mark.distributed
def test_expert_parallel_errors_on_every_rank():
    per_rank = run_distributed(_distributed_errors, 4)

    def expect(results, case, kind, *fragments):
        got = results[case]
        assert got is not None, f"{case}: no error"
        assert got[0] == kind and all(fragment in got[1] for fragment in fragments), (case, got)

    for rank, results in enumerate(per_rank):
        assert results["group_timeouts"] == [PROCESS_GROUP_TIMEOUT_S], results["group_timeouts"]
        expect(results, "mesh_without_ep", "ValueError", "ep_mesh_dim: expected the name of a dimension of the "
               "DeviceMesh (its dimensions: ('dp', 'tp')), got 'ep'")
        expect(results, "mesh_without_tp", "ValueError", "tp_mesh_dim: expected the name of a dimension",
               "('ep',)", "got 'tp'")
        expect(results, "same_dim", "ValueError", "tp_mesh_dim: expected a dimension other than the EP one")
        for case in ("ep_larger_than_e_from_full", "ep_larger_than_e_seeded"):
            expect(results, case, "ValueError", "ep_size: expected at most num_experts = 3 EP ranks", "got an EP "
                   "group of 4")
        expect(results, "ep_dim_with_process_group", "ValueError", "ep_mesh_dim: only used with a DeviceMesh")
        expect(results, "ep_group_not_a_group", "TypeError", "ep_group: expected a torch.distributed ProcessGroup",
               "got int")
        expect(results, "ep_group_with_mesh", "ValueError", "group: a DeviceMesh with ep_group")
        expect(results, "sequence_parallel", "ValueError", "sequence_parallel: expected False with expert "
               "parallelism")
        expect(results, "overlapping_groups", "ValueError", f"sharing only this rank ({rank})")
        kind, message = results["mismatched_tp_sizes"]
        assert kind == "ValueError" and ("inconsistent groups" in message or "found its" in message), message
        kind, message = results["one_rank_bad_shards"]
        if rank == 3:
            assert kind == "ValueError" and "EP rank 1 of an EP group of size 2 (experts [4, 7))" in message, message
        else:
            assert kind == "ValueError" and ("rejected its shards" in message or "found its" in message), message
        assert results["good_block_after"] == (3, CONFIG.hidden_size)
        assert results["check_counts"] == {"all_to_all_single": 3, "all_reduce": 1, ALL_GATHER: 2}, \
            results["check_counts"]
        expect(results, "tokens_differ_in_tp_group", "ValueError",
               "hidden_states on rank 1 of the TP group differs from rank 0")
        expect(results, "router_differs_in_ep_group", "ValueError",
               "router_weight on rank 1 of the EP group differs from rank 0")
    # Ranks 0 and 2 (and 1 and 3) are EP peers with TP groups of two and one: they name the sizes.
    assert "has tp_size=1 but rank 0 of it tp_size=2" in per_rank[0]["mismatched_tp_sizes"][1]
