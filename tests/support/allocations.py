"""The largest tensor storage any ATen op makes while a piece of code runs, seen by a
TorchDispatchMode: what shows that a block built for quantized experts never makes a dense copy
of them (a zero-stride stand-in has a one-element storage; a copy of it, the whole tensor's)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestAllocation(TorchDispatchMode):
    """`nbytes`: the largest storage among the outputs of the ops run inside the `with`, and `op`
    the op that made it."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.op = tensor.untyped_storage().nbytes(), str(func)
        return out
