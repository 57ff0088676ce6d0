"""Counting the torch.distributed collectives a block issues, by name (tests and `tpmoe verify`).

`CollectiveCounter` wraps the public torch.distributed functions (COUNTED) while it is active.
tpmoe.distributed looks them up as `torch.distributed.<name>` at each call, so every collective
it issues passes through the wrapper, which adds nothing but a count.

Since torch 2.13 the old all_gather_into_tensor / reduce_scatter_tensor call the *_single ones
through the module, so one old-name call would count twice; tpmoe calls the *_single names
where they exist, and ALL_GATHER / REDUCE_SCATTER name what is expected.
"""
from collections import Counter

import torch.distributed as dist

COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
           "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all",
           "all_to_all_single", "gather", "scatter", "barrier", "all_gather_object", "broadcast_object_list",
           "send", "recv", "isend", "irecv")

ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


class CollectiveCounter:
    """Context manager counting calls of the torch.distributed collectives, by name."""

    def __init__(self):
        self.counts = Counter()
        self._originals = {}

    def __enter__(self):
        for name in COUNTED:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original

            def counting(*args, _counted_name=name, _original=original, **kwargs):
                self.counts[_counted_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counting)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}
        return False

    def total(self) -> int:
        return sum(self.counts.values())

    def take(self) -> Counter:
        """The counts since the last take (zeros left out; a missing name reads 0), then reset."""
        counts, self.counts = self.counts, Counter()
        return +counts
