"""Real multi-process runs for the tensor-parallel tests: gloo on 127.0.0.1, spawned processes.

`run_distributed(fn, world_size, *args)` starts `world_size` processes, each joining a gloo
process group on a free port of 127.0.0.1 with a timeout (a hung collective then raises in
the rank instead of hanging CI), runs `fn(rank, world_size, *args)` there and returns the
list of its per-rank return values (picklable: numbers, strings, small CPU tensors) to the
parent. An exception in a rank fails the parent with that rank's traceback. A port another
process took first is retried on a new one, as the CLI launcher does
(tpmoe.distributed.groups.run_on_free_port).

`CollectiveCounter` (tpmoe.distributed.counting) counts collectives by wrapping the public
`torch.distributed` functions.
"""
import contextlib
import datetime
import pickle
import queue as queue_module
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Re-exported for the tests: the counter lives in the package so that `tpmoe verify` uses it too.
from tpmoe.distributed import destroy_process_group_collected
from tpmoe.distributed.counting import ALL_GATHER, REDUCE_SCATTER, CollectiveCounter  # noqa: F401
from tpmoe.distributed.groups import run_on_free_port

PROCESS_GROUP_TIMEOUT_S = 60


def new_group(ranks):
    """dist.new_group(ranks) with the tests' short timeout: torch's default for a new group is 30
    minutes whatever the world group's (a DeviceMesh's groups do inherit the world's), so a rank
    left waiting in one would hold the test that long."""
    return dist.new_group(ranks, timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))


def group_timeout_s(group) -> float:
    """The timeout of `group`'s CPU backend, in seconds (for tests asserting it is short)."""
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def _worker(fn, rank, world_size, port, timeout_s, results, args):
    try:
        # Two cores are shared by every rank (and other jobs): one thread each avoids oversubscription.
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            # Pickled here, by value: a tensor put on a multiprocessing queue as it is travels as a
            # shared-memory handle that the parent opens after this process may have exited
            # (FileNotFoundError in the parent, seen on a loaded machine).
            results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        finally:
            destroy_process_group_collected()
    except BaseException:  # reported to the parent, which fails the test with it
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, *args, timeout_s: int = PROCESS_GROUP_TIMEOUT_S, runs: int = 1):
    """fn(rank, world_size, *args) on `world_size` gloo ranks -> [result of rank 0, 1, ...].
    `runs`: how many tests' work fn does (SharedSpawns), each given the deadline of one spawn."""
    return run_on_free_port(lambda port: _run_distributed_once(fn, world_size, args, timeout_s, port, runs),
                            AssertionError)


def _run_distributed_once(fn, world_size: int, args, timeout_s: int, port: int, runs: int):
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(fn, rank, world_size, port, timeout_s, results, args))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    collected, errors = {}, []
    # Startup (importing torch per process on a loaded machine) plus the group timeout.
    deadline_s = runs * (3 * timeout_s + 60)
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=deadline_s)
            if status == "ok":
                collected[rank] = pickle.loads(value)
            else:
                errors.append(f"--- rank {rank} of {world_size} ---\n{value}")
    except queue_module.Empty:
        missing = sorted(set(range(world_size)) - set(collected))
        errors.append(f"ranks {missing} of {world_size} returned nothing within {deadline_s} s")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return [collected[rank] for rank in range(world_size)]


@contextlib.contextmanager
def counting_collectives():
    with CollectiveCounter() as counter:
        yield counter


def error_of(call):
    """(exception type name, message) of call(), or None if it returned: what a rank records
    for the parent test to assert on."""
    try:
        call()
    except Exception as error:  # recorded for the parent to assert on
        return type(error).__name__, str(error)
    return None


def _run_cases_worker(rank, world_size, cases):
    """In each rank: every case in order, its result or its traceback. After each case the ranks
    agree (one all-reduce, outside whatever the case counts) on whether any rank failed it; if
    one did, the later cases are not run, since a rank may have left a collective the others
    are still in."""
    results, failed = {}, None
    for case_id, fn, args in cases:
        if failed is not None:
            results[case_id] = ("not run", f"not run: case {failed!r} failed earlier in the same spawn")
            continue
        try:
            results[case_id] = ("ok", fn(rank, world_size, *args))
        except Exception:  # reported to the parent under this case's name
            results[case_id] = ("error", traceback.format_exc())
        try:
            flag = torch.tensor([results[case_id][0] != "ok"], dtype=torch.int32)
            dist.all_reduce(flag)
            any_failed = bool(flag.item())
        except Exception:  # out of step with a rank still in the case's collective: stop here
            any_failed = True
        if any_failed:
            failed = case_id
    return results


class SharedSpawns:
    """Several tests' cases in ONE spawn per world size instead of one spawn per test (a spawn
    costs seconds per rank: each imports torch and tpmoe; the cases here take less).

    `cases` is {case id: (world size, fn, args)}; each case is fn(rank, world_size, *args), as
    for run_distributed. The first test to ask for a case of a world size runs all that world
    size's cases, in the order given; `results(case_id)` is then that case's [result of rank 0,
    1, ...], or fails the asking test with the case's own traceback (ranks and case named). Use
    it from a module-scoped fixture, so that each test still reports its own case. A spawn's
    deadline is the sum of its cases' (each the deadline of a spawn of its own): no case has less
    time than before."""

    def __init__(self, cases, timeout_s: int = PROCESS_GROUP_TIMEOUT_S):
        self.cases, self.timeout_s, self.done = cases, timeout_s, {}

    def run(self, world_size):
        """Runs the spawn of `world_size` now, if it has not run (its failures are kept for results)."""
        if world_size not in self.done:
            batch = [(other, fn, args) for other, (size, fn, args) in self.cases.items() if size == world_size]
            try:
                self.done[world_size] = run_distributed(_run_cases_worker, world_size, batch,
                                                        timeout_s=self.timeout_s, runs=len(batch))
            except AssertionError as error:  # the spawn itself failed: every case of it fails with it
                self.done[world_size] = error

    def run_all(self):
        """Every spawn now: for cases whose files later spawns read."""
        for world_size, _, _ in self.cases.values():
            self.run(world_size)

    def results(self, case_id):
        world_size = self.cases[case_id][0]
        self.run(world_size)
        per_rank = self.done[world_size]
        if isinstance(per_rank, AssertionError):
            raise AssertionError(f"case {case_id!r}: {per_rank}")
        errors = [f"--- case {case_id!r}, rank {rank} of {world_size} ---\n{results[case_id][1]}"
                  for rank, results in enumerate(per_rank) if results[case_id][0] != "ok"]
        if errors:
            raise AssertionError("distributed case failed:\n" + "\n".join(errors))
        return [results[case_id][1] for results in per_rank]
