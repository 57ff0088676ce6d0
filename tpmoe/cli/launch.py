"""Starting the ranks of a `tpmoe verify` / `tpmoe bench` run.

Three ways, picked by `run_ranks`:
  torchrun    RANK / WORLD_SIZE / MASTER_ADDR are set: this process is one rank; the process
              group comes from that environment (multi-node is whatever torchrun does).
  in-process  world size 1 and no torchrun: no process group at all (group None).
  spawn       otherwise: `world_size` processes on this machine joining a group on a free port
              of 127.0.0.1.
Backend: NCCL with one GPU per rank where CUDA is available, gloo on CPU. The process group
gets a timeout, so a hung collective raises in the rank instead of hanging the command.

The worker is `worker(context, payload)` (a module-level function, so that spawn can pickle
it); every rank's return value comes back to the caller as a list in rank order. Rank 0 may
call `context.send(message)` to report progress while it runs (`on_message` receives it).
"""
import datetime
import os
import queue as queue_module
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ..distributed import destroy_process_group_collected
from ..distributed.groups import run_on_free_port

DEFAULT_TIMEOUT_S = 300


class RankFailure(RuntimeError):
    """A rank raised or died: the message holds its traceback."""


@dataclass
class RankContext:
    rank: int
    world_size: int
    group: Optional[object]    # the process group of all ranks; None in-process
    device: torch.device
    backend: Optional[str]     # "nccl", "gloo" or None (in-process)
    launcher: str              # "torchrun", "spawn" or "in-process"
    send: Callable[[object], None]


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def torchrun_world_size() -> Optional[int]:
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else None


def is_main_process() -> bool:
    """Whether this process prints the results: rank 0 under torchrun, the parent otherwise."""
    return int(os.environ.get("RANK", "0")) == 0 if launched_by_torchrun() else True


def max_world_size(device_type: str) -> int:
    """The largest world size this machine can run: its GPUs on CUDA (NCCL wants one GPU per
    rank); on CPU a few ranks per core (the TP tests run 4 ranks on 2 cores), never fewer than 4."""
    if device_type == "cuda":
        return torch.cuda.device_count()
    return max(4, 2 * (os.cpu_count() or 1))


def pick_device(world_size: int, requested: str = "auto") -> str:
    """"cuda" when CUDA is there with a GPU for each rank, else "cpu" (requested: auto|cpu|cuda)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and (launched_by_torchrun() or world_size <= torch.cuda.device_count()):
        return "cuda"
    return "cpu"


def _device_and_backend(local_rank: int, device_type: str):
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def _spawned_rank(worker, payload, rank, world_size, port, timeout_s, results, device_type):
    try:
        device, backend = _device_and_backend(rank, device_type)
        if device.type == "cpu":
            # The ranks share this machine's cores: one share each avoids oversubscription.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            send = (lambda message: results.put((rank, "message", message))) if rank == 0 else (lambda message: None)
            context = RankContext(rank, world_size, dist.group.WORLD, device, backend, "spawn", send)
            results.put((rank, "ok", worker(context, payload)))
        finally:
            destroy_process_group_collected()
    except BaseException:  # reported to the parent, which fails the command with it
        results.put((rank, "error", traceback.format_exc()))


def _run_spawned(worker, payload, world_size, on_message, timeout_s, device_type) -> List[object]:
    return run_on_free_port(lambda port: _run_spawned_once(worker, payload, world_size, on_message, timeout_s,
                                                           device_type, port), RankFailure)


def _run_spawned_once(worker, payload, world_size, on_message, timeout_s, device_type, port) -> List[object]:
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_spawned_rank, args=(worker, payload, rank, world_size, port, timeout_s,
                                                             results, device_type), daemon=True)
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    collected, errors, dead_since = {}, [], {}
    try:
        while len(collected) < world_size and not errors:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue_module.Empty:
                # A rank that died without a word (killed, out of memory): give its last message
                # a few seconds to arrive through the queue, then report it.
                now = time.monotonic()
                for rank, process in enumerate(processes):
                    if rank not in collected and process.exitcode is not None:
                        if now - dead_since.setdefault(rank, now) > 5:
                            errors.append(f"rank {rank} of {world_size} exited with code {process.exitcode} "
                                          f"without a result")
                continue
            if status == "message":
                if on_message is not None:
                    on_message(value)
            elif status == "ok":
                collected[rank] = value
            else:
                errors.append(f"--- rank {rank} of {world_size} ---\n{value}")
    finally:
        for process in processes:
            # After a failure the other ranks would wait in a collective until the timeout.
            process.join(timeout=10 if not errors else 0.5)
            if process.is_alive():
                process.terminate()
                process.join()
    if errors:
        raise RankFailure("\n".join(errors))
    return [collected[rank] for rank in range(world_size)]


def _run_torchrun(worker, payload, on_message, timeout_s, gather, device_type) -> List[object]:
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    device, backend = _device_and_backend(local_rank, device_type)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        send = (on_message or (lambda message: None)) if rank == 0 else (lambda message: None)
        context = RankContext(rank, world_size, dist.group.WORLD, device, backend, "torchrun", send)
        result = worker(context, payload)
        if not gather:
            return [result]
        gathered = [None] * world_size
        dist.all_gather_object(gathered, result)
        return gathered
    finally:
        if owns_group:
            destroy_process_group_collected()


def run_ranks(worker, payload, world_size: int, *, on_message=None, timeout_s: int = DEFAULT_TIMEOUT_S,
              gather: bool = True, device_type: Optional[str] = None) -> List[object]:
    """worker(context, payload) on every rank -> [result of rank 0, 1, ...] (see the module docstring).

    gather=False under torchrun: each rank gets only [its own result] (no final collective, so a
    rank that finished early does not wait for the others). device_type: "cuda" (one GPU per
    rank, NCCL) or "cpu" (gloo); None: pick_device(world_size)."""
    device_type = device_type or pick_device(world_size)
    if launched_by_torchrun():
        return _run_torchrun(worker, payload, on_message, timeout_s, gather, device_type)
    if world_size == 1:
        device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        context = RankContext(0, 1, None, device, None, "in-process", on_message or (lambda message: None))
        return [worker(context, payload)]
    return _run_spawned(worker, payload, world_size, on_message, timeout_s, device_type)
