"""The measuring helpers of benchmarks/common.py: peak memory counts each allocation once
(nested op events carry their children's memory too), and interleaved timing gives every
implementation the same number of samples, in alternating order."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from common import peak_memory_bytes, time_calls_interleaved  # noqa: E402


def test_peak_memory_counts_nested_allocations_once():
    size = 1 << 20

    def allocate():
        # randn allocates through a nested aten::empty; the kept tensor and a freed temporary.
        kept = torch.randn(size)  # 4 MiB, alive at the peak
        temporary = torch.empty(size // 2)  # 2 MiB, freed before the next one
        del temporary
        other = torch.empty(size // 4)  # 1 MiB
        return kept, other

    peak = peak_memory_bytes(allocate)
    assert peak == 4 * size + 2 * size, peak


def test_interleaved_timing_samples_every_call_alike():
    order = []
    calls = {name: (lambda n: lambda: order.append(n))(name) for name in ("a", "b", "c")}
    results = time_calls_interleaved(calls, warmup=1, repeats=4)
    assert order[:3] == ["a", "b", "c"]  # warm-up
    assert order[3:] == ["a", "b", "c", "c", "b", "a"] * 2
    assert all(result.repeats == 4 and len(result.samples_s) == 4 for result in results.values())
    assert all(result.min_s <= result.median_s for result in results.values())
