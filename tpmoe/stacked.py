"""How a MoEBlock stores its weights: the stacked layout, a view of tpmoe.weights' format.

The format (tpmoe.weights) packs a gated expert's gate and up halves on one axis of 2I rows. A
TP rank's slice of that axis is two ranges (its gate rows and its up rows), which no single
DTensor shard, FSDP2 shard or distributed-checkpoint chunk can describe. So the block's
parameters keep the halves on an axis of their own, and the intermediate axis I becomes one
plain axis that TP cuts like any other (DTensor's Shard, torch.chunk's sizes):

  w_gate_up       concatenated [E, 2I, H] -> [E, 2, I, H]    TP axis 2
                  interleaved  [E, 2I, H] -> [E, I, 2, H]    TP axis 1
                  gpt_oss      [E, H, 2I] -> [E, H, I, 2]    TP axis 2
                  not gated    unchanged: [E, I, H] (axis 1), gpt_oss [E, H, I] (axis 2)
  b_gate_up       [E, 2I] -> [E, 2, I] (axis 2) concatenated, [E, I, 2] (axis 1) otherwise
  w_down          unchanged, TP axis 2 ([E, I, H] for gpt_oss: axis 1)
  shared_gate_up  [2Is, H] -> [2, Is, H] (axis 1); not gated [Is, H] (axis 0)
  shared_down     unchanged, TP axis 1
  replicated      unchanged (router_weight, router_bias, correction_bias, b_down, shared_gate)

Each is a reshape of the same memory, so going either way is a view (no copy on the hot path:
the kernels take the format). The routed experts' axis 0 is the EP axis. A TP rank's stacked
slice, reshaped back, is exactly tpmoe.sharding's shard of the format.
"""
from typing import Optional, Tuple

import torch

from .config import MoEConfig

# The routed per-expert weights: EP splits their axis 0.
EXPERT_AXIS = 0


def _gate_up_axis(config: MoEConfig, name: str) -> Optional[int]:
    """The format's 2I (R) axis of a gate/up weight (None: not a gate/up weight or not gated)."""
    if not config.gated:
        return None
    if name == "w_gate_up":
        return 2 if config.layout == "gpt_oss" else 1
    if name == "b_gate_up":
        return 1
    if name == "shared_gate_up":
        return 0
    return None


def _halves_first(config: MoEConfig, name: str) -> bool:
    """Whether the halves axis comes before I (concatenated packing) or after it (interleaved)."""
    return name == "shared_gate_up" or config.layout == "concatenated"


def stacked_shape(config: MoEConfig, name: str, format_shape) -> Tuple[int, ...]:
    """The stacked shape of weight `name` from its format shape (full or a TP slice alike)."""
    shape = tuple(format_shape)
    axis = _gate_up_axis(config, name)
    if axis is None:
        return shape
    rows = shape[axis]
    if rows % 2:
        raise ValueError(f"{name}: expected an even size on the gate/up axis {axis} of shape {shape}, got {rows}")
    halves = (2, rows // 2) if _halves_first(config, name) else (rows // 2, 2)
    return shape[:axis] + halves + shape[axis + 1:]


def to_stacked(config: MoEConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A view of the format tensor `tensor` in the stacked layout."""
    return tensor.view(stacked_shape(config, name, tensor.shape))


def to_format(config: MoEConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The format view of a stacked tensor (a view wherever the halves and I axes are laid out as
    the stacked layout makes them; a copy only for a tensor someone restrided)."""
    axis = _gate_up_axis(config, name)
    if axis is None:
        return tensor
    shape = tuple(tensor.shape)
    return tensor.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2:])


def tp_axis(config: MoEConfig, name: str) -> int:
    """The axis of the stacked weight `name` that TP cuts (the intermediate one)."""
    if name == "w_gate_up":
        if not config.gated:
            return 2 if config.layout == "gpt_oss" else 1
        return {"concatenated": 2, "interleaved": 1, "gpt_oss": 2}[config.layout]
    if name == "b_gate_up":
        return 2 if config.gated and config.layout == "concatenated" else 1
    if name == "w_down":
        return 1 if config.layout == "gpt_oss" else 2
    if name == "shared_gate_up":
        return 1 if config.gated else 0
    if name == "shared_down":
        return 1
    raise ValueError(f"name: expected a weight sliced by TP, got {name!r}")
