"""Timing a step on every rank of a group: warm-up, then repeats, each step's time being the
time of its SLOWEST rank (the ranks wait for each other at the next collective anyway).

(benchmarks/common.py's time_call is the one-process version of this; with group None and one
process the two agree.)
"""
import statistics
import time
from typing import Callable, List, Optional

import torch
import torch.distributed as dist


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _communicates(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def _line_up(group, device) -> None:
    """All ranks start the next step together (a one-element all-reduce works on gloo and NCCL)."""
    if _communicates(group):
        dist.all_reduce(torch.zeros(1, device=device), group=group)


def time_step(step: Callable[[], object], *, device: torch.device, group=None, warmup: int = 1,
              repeats: int = 5) -> List[float]:
    """Seconds per step over `repeats` timed runs after `warmup` untimed ones; with a group, the
    per-step maximum over its ranks (every rank of the group must call this with the same counts)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        _line_up(group, device)
        synchronize(device)
        begin = time.perf_counter()
        step()
        synchronize(device)
        samples.append(time.perf_counter() - begin)
    if _communicates(group):
        slowest = torch.tensor(samples, dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        samples = slowest.tolist()
    return samples


def median_ms(samples_s: List[float]) -> Optional[float]:
    return statistics.median(samples_s) * 1e3 if samples_s else None
