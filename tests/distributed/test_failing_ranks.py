"""Failing ranks: a rank that raises, exits or stalls mid-step makes the others fail within the
process-group timeout with an error naming the collective that could not complete (never a
hang); shards that disagree across ranks are refused when the block is built, on every rank.

The fault cases need their own spawn runner: tests/support/dist_utils.run_distributed waits for one
result per rank, and a rank that calls os._exit never sends one. Here the parent watches the
processes too and stops waiting once every rank has reported or died. Gloo's timeout is short
(PROCESS_GROUP_TIMEOUT_S) so that the stalled-rank case costs seconds.
"""
import datetime
import os
import queue as queue_module
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from support.dist_utils import ALL_GATHER, error_of, run_distributed
from tpmoe import MoEConfig, random_moe_weights
from tpmoe.distributed import destroy_process_group_collected
from tpmoe.distributed.groups import run_on_free_port

pytestmark = pytest.mark.distributed

PROCESS_GROUP_TIMEOUT_S = 10
CONFIG = MoEConfig(hidden_size=8, intermediate_size=6, num_experts=4, top_k=2, shared_intermediate_size=3,
                   shared_expert_gate=True)


def _fault_worker(rank, world_size, port, stage, fault, results):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
        results.put((rank, "ok", _faulty_step(rank, stage, fault)))
        destroy_process_group_collected()
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def _inject(fault):
    if fault == "raise":
        raise RuntimeError("injected fault: this rank raised mid-step")
    if fault == "exit":
        os._exit(3)
    if fault == "stall":  # alive, but never reaches the collective within the timeout
        time.sleep(PROCESS_GROUP_TIMEOUT_S + 6)
        return "stalled"


def _faulty_step(rank, stage, fault):
    """Rank 1 injects `fault` just before `stage`; rank 0 runs the step and reports what it got."""
    from tpmoe.block import MoEBlock

    faulty = rank == 1
    weights = random_moe_weights(CONFIG, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, CONFIG.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
    started = time.monotonic()
    try:
        if faulty and stage == "construction":
            return _inject(fault)
        sequence_parallel, expert_parallel = stage.startswith("sp_"), stage.startswith("ep_")
        if expert_parallel:  # EP 2: each rank owns 2 of the 4 experts
            block = MoEBlock.from_full(CONFIG, weights, ep_group=dist.group.WORLD)
        else:
            block = MoEBlock.from_full(CONFIG, weights, group=dist.group.WORLD, sequence_parallel=sequence_parallel)
        local_x = x[3 * rank:3 * rank + 3] if sequence_parallel or expert_parallel else x
        if faulty and stage in ("forward", "sp_forward", "ep_forward"):
            return _inject(fault)
        y = block(local_x)
        if faulty and stage in ("backward", "sp_backward", "ep_backward"):
            return _inject(fault)
        y.sum().backward()
    except Exception as error:
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - started,
                "cause": type(error.__cause__).__name__ if error.__cause__ is not None else None}
    return {"type": None, "seconds": time.monotonic() - started}


def _run_with_fault(stage, fault, world_size=2):
    """{rank: ("ok", value) | ("error", traceback) | ("died", exitcode)} and the parent's wall time."""
    return run_on_free_port(lambda port: _run_with_fault_once(stage, fault, world_size, port), _PortTaken)


class _PortTaken(RuntimeError):
    """A rank could not bind the port (another process took it first): the run is retried on a new one."""


def _run_with_fault_once(stage, fault, world_size, port):
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_fault_worker, args=(rank, world_size, port, stage, fault, results))
                 for rank in range(world_size)]
    started = time.monotonic()
    for process in processes:
        process.start()
    reports = {}
    deadline = started + 3 * PROCESS_GROUP_TIMEOUT_S + 90  # torch imports on a loaded machine + the timeout
    try:
        while len(reports) < world_size and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=0.5)
                reports[rank] = (status, value)
            except queue_module.Empty:
                for rank, process in enumerate(processes):
                    if rank not in reports and not process.is_alive() and process.exitcode not in (None, 0):
                        reports[rank] = ("died", process.exitcode)
    finally:
        for process in processes:
            process.join(timeout=PROCESS_GROUP_TIMEOUT_S + 10)
            if process.is_alive():
                process.terminate()
                process.join()
    for status, value in reports.values():
        if status == "error" and "address already in use" in value.lower():
            raise _PortTaken(value)
    return reports, time.monotonic() - started


# (stage where rank 1 fails, fault, the collective rank 0 must name)
FAULT_CASES = [
    ("forward", "raise", "MoEBlock forward all-reduce of the partial output"),
    ("backward", "exit", "MoEBlock backward all-reduce of [dx | dtopk_weights | dshared_gate]"),
    ("forward", "stall", "MoEBlock forward all-reduce of the partial output"),
    ("construction", "raise", "the construction-time check that the ranks' shards agree"),
    ("sp_forward", "exit", "MoEBlock (sequence-parallel) forward all-gather"),
    ("ep_forward", "exit", "MoEBlock (expert-parallel) forward all-to-all of the per-expert token counts"),
    ("ep_backward", "raise", "MoEBlock (expert-parallel) backward all-to-all of d outputs (the combine's backward)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage, fault, collective", FAULT_CASES, ids=[f"{s}-{f}" for s, f, _ in FAULT_CASES])
def test_a_failing_rank_makes_the_others_fail_naming_the_collective(stage, fault, collective):
    reports, wall_s = _run_with_fault(stage, fault)
    assert 0 in reports, f"rank 0 reported nothing (a hang?): {reports}"
    status, outcome = reports[0]
    assert status == "ok", outcome
    assert outcome["type"] == "CollectiveError", outcome
    message = outcome["message"]
    assert collective in message and "this rank 0 of 2" in message, message
    assert "another rank raised, exited or did not reach the same collective" in message, message
    assert outcome["cause"] == "RuntimeError", outcome  # the transport's own error stays chained
    # Within the process-group timeout (plus scheduling slack on two shared cores), never a hang.
    assert outcome["seconds"] < PROCESS_GROUP_TIMEOUT_S + 15, outcome
    if fault == "stall":
        assert "Timed out" in message, message
    if fault == "exit":
        assert reports.get(1) == ("died", 3), reports
    if fault == "raise":
        assert reports[1][0] == "ok" or "injected fault" in reports[1][1], reports[1]
    assert wall_s < 3 * PROCESS_GROUP_TIMEOUT_S + 90


# ---------------------------------------------------------------------------------------------
# Shards that disagree across ranks: refused at construction, on every rank, with ONE all-gather.


def _mismatched_shards(rank, world_size):
    import dataclasses

    from support.dist_utils import CollectiveCounter
    from tpmoe.block import MoEBlock
    from tpmoe.sharding import shard_moe_weights

    group = dist.group.WORLD
    weights = random_moe_weights(CONFIG, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, CONFIG.hidden_size, generator=torch.Generator().manual_seed(1))
    results = {}

    with CollectiveCounter() as counter:
        agreeing = MoEBlock.from_full(CONFIG, weights, group=group)
    results["construction_counts"] = dict(counter.counts)

    # Rank 1 believes the intermediate size is 8: its shards fit ITS config (so its local check
    # passes) but not rank 0's; run, the all-reduce would sum columns of different experts' slices.
    wider = dataclasses.replace(CONFIG, intermediate_size=8)
    config = wider if rank == 1 else CONFIG
    weights_for_config = random_moe_weights(config, generator=torch.Generator().manual_seed(0))
    results["config_differs"] = error_of(lambda: MoEBlock.from_full(config, weights_for_config, group=group))
    # Rank 1 cut its shards with another shard_unit: same config, other shard sizes (refused there).
    shard_unit = 2 if rank == 1 else 1
    shards = shard_moe_weights(CONFIG, weights, rank, world_size, shard_unit)
    results["shard_unit_differs"] = error_of(lambda: MoEBlock.from_shards(CONFIG, shards, group=group,
                                                                          shard_unit=shard_unit))
    # Rank 1 holds float64 weights.
    dtype = torch.float64 if rank == 1 else torch.float32
    results["dtype_differs"] = error_of(lambda: MoEBlock.from_full(CONFIG, weights, group=group, dtype=dtype))
    # Only rank 1's shards are wrong (cut for a world size of 3): it raises its own error, the
    # other ranks learn it in the same all-gather instead of waiting for it in the first forward.
    shards = shard_moe_weights(CONFIG, weights, rank, 3 if rank == 1 else world_size)
    results["one_rank_rejects"] = error_of(lambda: MoEBlock.from_shards(CONFIG, shards, group=group))

    # After all of that the group is healthy: the agreeing block still runs, equal on both ranks.
    results["output"] = agreeing(x).detach().numpy().tobytes()  # bytes: no shared-memory handle to outlive us
    return results


@pytest.mark.slow
def test_mismatched_shards_across_ranks_fail_at_construction_on_every_rank():
    per_rank = run_distributed(_mismatched_shards, 2, timeout_s=PROCESS_GROUP_TIMEOUT_S)
    for rank, results in enumerate(per_rank):
        assert results["construction_counts"] == {ALL_GATHER: 1}, results["construction_counts"]
        kind, message = results["config_differs"]
        assert kind == "ValueError" and "rank 1 of the TP group was built with config.intermediate_size=8 but " \
            "rank 0 with 6" in message and f"seen from rank {rank}" in message, message
        # A parallel block takes shard_unit 1 only (DTensor's rule): rank 1 raises its own error,
        # rank 0 learns of it in the agreement all-gather.
        kind, message = results["shard_unit_differs"]
        expected = ("shard_unit: expected 1 for a parallel block" if rank == 1
                    else "rank 1 of the TP group rejected its shards")
        assert kind == "ValueError" and expected in message, message
        kind, message = results["dtype_differs"]
        assert kind == "ValueError" and "rank 1 of the TP group holds float64 weights but rank 0 float32" in message, \
            message
        kind, message = results["one_rank_rejects"]
        if rank == 1:
            assert kind == "ValueError" and "rank 1 of a TP group of world size 2" in message \
                and "another world size" in message, message
        else:
            assert kind == "ValueError" and "rank 1 of the TP group rejected its shards" in message, message
    assert per_rank[0]["output"] == per_rank[1]["output"]
