"""Counting the torch.distributed collectives a block issues, by name (tests and `tpmoe verify`).

`CollectiveCounter` wraps the public torch.distributed functions (COUNTED) while it is active.
tpmoe.distributed looks them up as `torch.distributed.<name>` at each call, so every collective
it issues passes through the wrapper, which adds nothing but a count (and the bytes of the
tensor the rank hands in: `tpmoe bench --ep` reports them per collective).

Since torch 2.13 the old all_gather_into_tensor / reduce_scatter_tensor call the *_single ones
through the module, so one old-name call would count twice; tpmoe calls the *_single names
where they exist, and ALL_GATHER / REDUCE_SCATTER name what is expected.
"""
from collections import Counter

import torch
import torch.distributed as dist

COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
           "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all",
           "all_to_all_single", "gather", "scatter", "barrier", "all_gather_object", "broadcast_object_list",
           "send", "recv", "isend", "irecv")

ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


# The positional index (and keyword) of the tensor a rank hands to each collective: the bytes
# counted are those of this input (all_to_all_single: every row it sends, its own rows included;
# all_reduce: the reduced tensor; an all-gather: this rank's part). Lists of tensors are summed;
# object collectives and barriers count no bytes.
_INPUT_ARGUMENT = {"all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "reduce": (0, "tensor"),
                   "all_to_all_single": (1, "input"), "all_to_all": (1, "input_tensor_list"),
                   "all_gather": (1, "tensor"), "all_gather_into_tensor": (1, "input_tensor"),
                   "all_gather_single": (1, "input_tensor"), "reduce_scatter": (1, "input_list"),
                   "reduce_scatter_tensor": (1, "input"), "reduce_scatter_single": (1, "input"),
                   "gather": (0, "tensor"), "scatter": (1, "scatter_list"), "send": (0, "tensor"),
                   "isend": (0, "tensor")}


def input_bytes(name: str, args, kwargs) -> int:
    """The bytes of the tensor(s) this rank hands to the collective `name` called with args/kwargs."""
    if name not in _INPUT_ARGUMENT:
        return 0
    index, keyword = _INPUT_ARGUMENT[name]
    value = args[index] if len(args) > index else kwargs.get(keyword)
    tensors = value if isinstance(value, (list, tuple)) else [value]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class CollectiveCounter:
    """Context manager counting calls of the torch.distributed collectives, by name, and the
    bytes of their inputs (`bytes`, by name: see input_bytes)."""

    def __init__(self):
        self.counts = Counter()
        self.bytes = Counter()
        self._originals = {}

    def __enter__(self):
        for name in COUNTED:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original

            def counting(*args, _counted_name=name, _original=original, **kwargs):
                self.counts[_counted_name] += 1
                self.bytes[_counted_name] += input_bytes(_counted_name, args, kwargs)
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

    def take_bytes(self) -> Counter:
        """The input bytes by name since the last take_bytes (zeros left out), then reset."""
        moved, self.bytes = self.bytes, Counter()
        return +moved
