"""The expert-parallel forward at EP 2 (two gloo ranks, ONE spawn): what it reads on the host and
what it does with out-of-range external ids.

- Host reads: docs/design.md promises ONE host sync per EP block forward, the device-to-host
  copy of the per-expert counts (all_to_all_single takes host split sizes). Counted on CPU by
  tests/support/launch_counting.HostSyncCounter (every .item()/int()/tolist(), every op whose output shape
  depends on the data, bincount and nonzero included), with the id checks that run on CPU tensors
  only switched off as on a GPU (run_as_on_a_gpu). tests/ops/test_gpu.py checks the same on CUDA.
- The mesh rule: from_full on a mesh whose one dimension is named "ep" is EP without ep_mesh_dim.
- Out-of-range external topk_ids: the rank holding them raises the ValueError TP mode raises,
  naming topk_ids and the range, before any collective (counted: none); the other rank, whose ids
  are good, then fails in the first collective, naming it (CollectiveError), instead of waiting.
  A wrong-range id on every rank raises the same ValueError on every rank, in EP and in TP mode.
"""
import pytest
import torch

from support.dist_utils import CollectiveCounter, error_of, run_distributed
from tpmoe import MoEConfig, random_moe_weights

CONFIG = MoEConfig(hidden_size=8, intermediate_size=6, num_experts=6, top_k=2, shared_intermediate_size=3)
EXTERNAL = MoEConfig(hidden_size=8, intermediate_size=6, num_experts=6, top_k=2, external_router=True)
# The message of tpmoe._checks.check_ids_in_range, the one range check of every mode.
OUT_OF_RANGE = "topk_ids: expected expert ids in [0, 6), got "


def _routing(num_tokens, generator, bad_id=None):
    weights = torch.rand(num_tokens, 2, generator=generator)
    ids = torch.stack([torch.randperm(6, generator=generator)[:2] for _ in range(num_tokens)])
    if bad_id is not None:
        ids[1, 1] = bad_id
    return None, weights, ids


def _ranks(rank, world_size):
    import pytest as pytest_in_rank
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from support.launch_counting import HostSyncCounter, run_as_on_a_gpu
    from tpmoe.block import MoEBlock

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    results = {}
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(5 + rank, CONFIG.hidden_size, generator=generator)

    weights = random_moe_weights(CONFIG, generator=torch.Generator().manual_seed(0))  # the same on every rank
    block = MoEBlock.from_full(CONFIG, weights, mesh, ep_mesh_dim="ep")
    block(x)  # first call: whatever is set up once (lazy imports, caches) is not counted
    with pytest_in_rank.MonkeyPatch.context() as monkeypatch, torch.no_grad():
        run_as_on_a_gpu(monkeypatch)
        with HostSyncCounter() as syncs:
            block(x)
    results["host_reads"] = syncs.reads

    # The mesh rule: a 1-D mesh named "ep" is expert parallel without ep_mesh_dim (it ran TP before).
    by_name = MoEBlock.from_full(CONFIG, weights, mesh)
    results["ep_by_name"] = (by_name.expert_parallel, by_name.ep_size, by_name.tp_size,
                             torch.equal(by_name(x), block(x)))

    external = MoEBlock.from_full(EXTERNAL, random_moe_weights(EXTERNAL, generator=torch.Generator().manual_seed(1)), mesh, ep_mesh_dim="ep")
    tensor_parallel = MoEBlock.from_full(EXTERNAL, random_moe_weights(EXTERNAL, generator=torch.Generator().manual_seed(1)), dist.group.WORLD)
    # Every rank's ids out of range (a negative id, then one past the end): ValueError everywhere,
    # no collective, in both modes.
    for mode, run in (("ep", external), ("tp", tensor_parallel)):
        for bad_id in (-1, 6):
            tokens = x if mode == "ep" else torch.randn(4, EXTERNAL.hidden_size, generator=torch.Generator())
            with CollectiveCounter() as counter:
                results[f"{mode}_all_bad_{bad_id}"] = error_of(lambda: run(tokens, routing=_routing(
                    tokens.shape[0], torch.Generator().manual_seed(3), bad_id=bad_id)))
            results[f"{mode}_all_bad_{bad_id}_collectives"] = dict(counter.counts)
        results[f"{mode}_expert_outputs_bad"] = error_of(
            lambda: run.expert_outputs(x, _routing(x.shape[0], generator, bad_id=6)[2]))
    # The groups still run a good forward afterwards.
    results["good_after"] = tuple(external(x, routing=_routing(x.shape[0], generator)).shape)
    # Last, as the other rank is left in a collective until this one exits. Rank 1 alone holds an id past the last expert (6): before the fix, both ranks got the counts
    # all-to-all's "Split sizes doesn't match" as a CollectiveError.
    with CollectiveCounter() as counter:
        results["one_rank_bad"] = error_of(lambda: external(x, routing=_routing(
            x.shape[0], generator, bad_id=6 if rank == 1 else None)))
    results["one_rank_bad_collectives"] = dict(counter.counts) if rank == 1 else None
    return results


@pytest.mark.distributed
def test_expert_parallel_forward_host_reads_and_out_of_range_ids():
    per_rank = run_distributed(_ranks, 2)
    for rank, results in enumerate(per_rank):
        reads = results["host_reads"]
        assert len(reads) == 1 and "Tensor.tolist" in reads[0], \
            f"rank {rank}: expected ONE host read (the counts' tolist) per EP forward, got {reads}"
        for mode in ("ep", "tp"):
            for bad_id in (-1, 6):
                got = results[f"{mode}_all_bad_{bad_id}"]
                assert got == ("ValueError", OUT_OF_RANGE + str(bad_id)), (rank, mode, bad_id, got)
                assert results[f"{mode}_all_bad_{bad_id}_collectives"] == {}, \
                    f"rank {rank}, {mode}: a collective ran before the range check"
            assert results[f"{mode}_expert_outputs_bad"] == ("ValueError", OUT_OF_RANGE + "6"), (rank, mode)
        assert results["ep_by_name"] == (True, 2, 1, True), results["ep_by_name"]
        assert results["good_after"] == (5 + rank, CONFIG.hidden_size)
    assert per_rank[1]["one_rank_bad"] == ("ValueError", OUT_OF_RANGE + "6"), per_rank[1]["one_rank_bad"]
    assert per_rank[1]["one_rank_bad_collectives"] == {}, per_rank[1]["one_rank_bad_collectives"]
    kind, message = per_rank[0]["one_rank_bad"]
    assert kind == "CollectiveError" and "per-expert token counts" in message, per_rank[0]["one_rank_bad"]
