"""The two communicating Functions of tensor-parallel (TP) mode (docs/design.md section 2).

    x, topk_weights, shared_gate (replicated) -> f -> partial experts -> g -> y (replicated)

Inside the f..g region every rank computes a partial sum over its intermediate columns.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .groups import communicates, naming_collective_failures


def _common_dtype(tensors):
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def pack_flat(tensors, dtype: torch.dtype) -> torch.Tensor:
    """One flat buffer holding every tensor, cast to `dtype`."""
    return torch.cat([tensor.reshape(-1).to(dtype) for tensor in tensors])


def unpack_flat(buffer: torch.Tensor, likes) -> list:
    """Inverse of pack_flat: tensors shaped and typed like `likes` (a list of (shape, dtype))."""
    out, offset = [], 0
    for shape, dtype in likes:
        numel = 1
        for size in shape:
            numel *= size
        out.append(buffer[offset:offset + numel].view(shape).to(dtype))
        offset += numel
    return out


class CopyToTensorParallelRegion(torch.autograd.Function):
    """f: enters the partial region with the replicated (x, topk_weights, shared_gate).

    forward:  identity on all three; no communication.
    backward: each rank holds partial gradients [dx_p | dtopk_weights_p | dshared_gate_p]
              (partial over its intermediate columns). ONE all-reduce (sum) of the three packed
              into one flat buffer makes them complete on every rank, so the router and the
              shared gate (outside the region) get full, bitwise-identical gradients with no
              further collective. The buffer uses the promoted dtype of the three (float32 when
              x is bf16 and the routing weights float32), so nothing is rounded below its dtype.
    A missing gradient (an input not used by this rank's shard) is sent as zeros: every rank
    joins the all-reduce whatever its shard holds.
    """

    @staticmethod
    def forward(ctx, group, hidden_states, topk_weights, shared_gate):
        ctx.group = group
        # topk_weights is None where the weights are applied after g (a per-expert output norm).
        ctx.present = [t is not None for t in (hidden_states, topk_weights, shared_gate)]
        ctx.likes = [(t.shape, t.dtype) for t in (hidden_states, topk_weights, shared_gate) if t is not None]
        return hidden_states, topk_weights, shared_gate

    @staticmethod
    def backward(ctx, grad_hidden, grad_topk_weights, grad_shared_gate):
        grads = [g for g, present in zip((grad_hidden, grad_topk_weights, grad_shared_gate), ctx.present) if present]
        device = next((grad.device for grad in grads if grad is not None), None)
        grads = [torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad
                 for grad, (shape, dtype) in zip(grads, ctx.likes)]
        buffer = pack_flat(grads, _common_dtype(grads))
        with naming_collective_failures("MoEBlock backward all-reduce of [dx | dtopk_weights | dshared_gate] (f)",
                                        ctx.group):
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=ctx.group)
        summed = iter(unpack_flat(buffer, ctx.likes))
        return (None, *[next(summed) if present else None for present in ctx.present])


class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """g: leaves the partial region.

    forward:  ONE all-reduce (sum) of the partial output y_p -> y on every rank.
    backward: identity (dy is replicated already); no communication.
    """

    @staticmethod
    def forward(ctx, group, partial_output):
        # A copy: the partial output may be saved by the Function that made it.
        output = partial_output.clone()
        with naming_collective_failures("MoEBlock forward all-reduce of the partial output (g)", group):
            dist.all_reduce(output, op=dist.ReduceOp.SUM, group=group)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return None, grad_output


def copy_to_tensor_parallel_region(hidden_states: torch.Tensor, topk_weights: Optional[torch.Tensor],
                                   shared_gate: Optional[torch.Tensor], group
                                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """f (see CopyToTensorParallelRegion); the identity in both directions without a group of 2+."""
    if not communicates(group):
        return hidden_states, topk_weights, shared_gate
    return CopyToTensorParallelRegion.apply(group, hidden_states, topk_weights, shared_gate)


def reduce_from_tensor_parallel_region(partial_output: torch.Tensor, group) -> torch.Tensor:
    """g (see ReduceFromTensorParallelRegion); the identity without a group of 2+."""
    if not communicates(group):
        return partial_output
    return ReduceFromTensorParallelRegion.apply(group, partial_output)
