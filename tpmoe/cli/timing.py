"""Timing for `tpmoe bench` and the scripts in benchmarks/: several implementations timed
interleaved, and the peak memory of a call.

Interleaved: each round times every implementation once (the order reversed every other round),
so that all of them sample the same moments of a machine whose speed drifts (a shared VM's memory
bandwidth moved between 20 and 40 GB/s within minutes). On the ranks of a process group, each
sample is the time of the SLOWEST rank (the ranks wait for each other at the next collective
anyway), and the ranks start every sample together.
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist


@dataclass
class Timing:
    median_s: float
    min_s: float
    repeats: int
    samples_s: List[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def max_s(self) -> float:
        return max(self.samples_s) if self.samples_s else self.median_s

    @property
    def quartiles_s(self) -> Tuple[float, float]:
        """(first, third) quartile of the samples ("inclusive": defined from 2 samples on; one
        sample gives (it, it))."""
        if len(self.samples_s) < 2:
            return self.median_s, self.median_s
        first, _, third = statistics.quantiles(self.samples_s, n=4, method="inclusive")
        return first, third


def synchronize(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _communicates(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def _line_up(group, device) -> None:
    """All ranks start the next sample together (a one-element all-reduce works on gloo and NCCL)."""
    if _communicates(group):
        dist.all_reduce(torch.zeros(1, device=device), group=group)


def time_calls_interleaved(calls: Dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 5,
                           min_time_s: float = 0.0, device: Optional[torch.device] = None,
                           group=None) -> Dict[str, Timing]:
    """Seconds per call of each of `calls`, `warmup` untimed runs each, then rounds of one timed
    run each while fewer than `repeats`, or while the rounds so far took under min_time_s (up to
    10x repeats, for very short calls). device: synchronized around every sample (CUDA). group:
    every rank of it calls this with the same calls in the same order; each sample is then the
    maximum over the ranks, and min_time_s must be 0 (the ranks could stop after different rounds)."""
    if min_time_s and _communicates(group):
        raise ValueError(f"min_time_s: expected 0 with a process group of several ranks, got {min_time_s}")
    for call in calls.values():
        for _ in range(warmup):
            call()
    synchronize(device)
    names = list(calls)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - started < min_time_s and rounds < 10 * repeats):
        for name in (names if rounds % 2 == 0 else reversed(names)):
            _line_up(group, device)
            synchronize(device)
            begin = time.perf_counter()
            calls[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - begin)
        rounds += 1
    if _communicates(group) and names:
        slowest = torch.tensor([samples[name] for name in names], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        samples = dict(zip(names, slowest.tolist()))
    return {name: Timing(statistics.median(values), min(values), len(values), values)
            for name, values in samples.items()}


def time_call(call: Callable[[], object], **options) -> Timing:
    """time_calls_interleaved for one call (the same options)."""
    return time_calls_interleaved({"call": call}, **options)["call"]


def peak_memory_bytes(call: Callable[[], object]) -> int:
    """Peak of the bytes allocated through torch's allocator during call(), above the level
    before it (the result is freed before the count ends). On CUDA torch.cuda's peak
    statistics; on CPU the memory events of torch.profiler, summed in time order. Memory a
    library allocates on its own (oneDNN scratch, std::vector) is not counted."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = call()
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
        del result
    # Each event's own allocations and frees (self_cpu_memory_usage): an op's cpu_memory_usage
    # also holds those of the ops below it, so summing it counts a nested allocation once per
    # level of nesting (an op that keeps a buffer past its return showed up 3x).
    changes = sorted((event.time_range.start, event.self_cpu_memory_usage) for event in prof.events()
                     if event.self_cpu_memory_usage)
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak
