"""The two communicating Functions of sequence-parallel (SP) mode (docs/design.md section 2).

Between blocks the tokens are sharded: rank p holds rows [offset_p, offset_p + T_p) of the
flattened tokens (T_p = tokens_per_rank[p]; all equal when tokens_per_rank is None). Each
rank routes its own tokens, then

    (x, topk_weights, topk_ids, shared_gate)_local -> gather -> partial experts over all T
        -> reduce-scatter -> y_local

which moves what one all-reduce moves. Uneven token counts are supported when every rank
passes the same `tokens_per_rank`: each rank's rows are padded to max(T_p) for the
collectives (which need equal sizes) and the padding is dropped again.
"""
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .groups import (all_gather_single, communicates, group_rank, group_size, naming_collective_failures,
                     reduce_scatter_single)
from .tensor_parallel import _common_dtype


def check_tokens_per_rank(tokens_per_rank: Optional[Sequence[int]], local_tokens: int, group) -> List[int]:
    """The token count of every rank; equal counts when None. Raises on what this rank can see."""
    world_size, rank = group_size(group), group_rank(group)
    if tokens_per_rank is None:
        return [local_tokens] * world_size
    counts = list(tokens_per_rank)
    if len(counts) != world_size or any(not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"tokens_per_rank: expected {world_size} non-negative ints (one per rank of the TP group "
                         f"of world size {world_size}), got {tokens_per_rank!r}")
    if counts[rank] != local_tokens:
        raise ValueError(f"tokens_per_rank: entry {rank} (this rank) is {counts[rank]} but this rank holds "
                         f"{local_tokens} tokens")
    return counts


def _as_byte_rows(tensor: torch.Tensor) -> torch.Tensor:
    """[T, C] of any dtype -> [T, C * itemsize] uint8 (the same bits)."""
    return tensor.contiguous().view(torch.uint8)


def _pad_rows(rows: torch.Tensor, padded: int) -> torch.Tensor:
    if rows.shape[0] == padded:
        return rows
    return torch.cat([rows, rows.new_zeros(padded - rows.shape[0], *rows.shape[1:])])


def _drop_padding(stacked: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """[P * max(counts), C] -> [sum(counts), C]: rank p's first counts[p] rows, in rank order."""
    padded = max(counts)
    if all(count == padded for count in counts):
        return stacked
    return torch.cat([stacked[p * padded:p * padded + count] for p, count in enumerate(counts)])


def _spread_rows(rows: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """[sum(counts), C] -> [P * max(counts), C]: inverse of _drop_padding, zeros in the padding."""
    padded = max(counts)
    if all(count == padded for count in counts):
        return rows.contiguous()
    out = rows.new_zeros(len(counts) * padded, *rows.shape[1:])
    offset = 0
    for p, count in enumerate(counts):
        out[p * padded:p * padded + count] = rows[offset:offset + count]
        offset += count
    return out


class GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Enters the partial region from token-sharded inputs.

    forward:  ONE all-gather of this rank's [x | topk_weights | topk_ids | shared_gate] rows,
              packed bit for bit into one uint8 buffer (no cast: x stays bf16, ids stay int64),
              -> the same four for all T tokens, on every rank.
    backward: ONE reduce-scatter (sum) of the packed [dx | dtopk_weights | dshared_gate] over
              all T tokens (promoted dtype), -> complete gradients of this rank's tokens.
    topk_ids carry no gradient.
    """

    @staticmethod
    def forward(ctx, group, counts, hidden_states, topk_weights, topk_ids, shared_gate):
        parts = [hidden_states, topk_weights, topk_ids] + ([shared_gate] if shared_gate is not None else [])
        byte_parts = [_as_byte_rows(part) for part in parts]
        widths = [part.shape[1] for part in byte_parts]
        local_bytes = _pad_rows(torch.cat(byte_parts, dim=1), max(counts))
        gathered = local_bytes.new_empty(len(counts) * max(counts), local_bytes.shape[1])
        with naming_collective_failures("MoEBlock (sequence-parallel) forward all-gather of [x | topk_weights | "
                                        "topk_ids | shared_gate]", group):
            all_gather_single(gathered, local_bytes, group=group)
        gathered = _drop_padding(gathered, counts)
        outputs, offset = [], 0
        for part, width in zip(parts, widths):
            outputs.append(gathered[:, offset:offset + width].contiguous().view(part.dtype))
            offset += width
        ctx.group, ctx.counts, ctx.rank = group, counts, dist.get_rank(group)
        ctx.grad_likes = [(part.shape[1], part.dtype) for i, part in enumerate(parts) if i != 2]
        ctx.has_shared_gate = shared_gate is not None
        ctx.mark_non_differentiable(outputs[2])
        if not ctx.has_shared_gate:
            outputs.append(None)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_hidden, grad_topk_weights, grad_topk_ids, grad_shared_gate):
        total = sum(ctx.counts)
        grads = [grad_hidden, grad_topk_weights] + ([grad_shared_gate] if ctx.has_shared_gate else [])
        device = next((g.device for g in grads if g is not None), None)
        grads = [torch.zeros(total, width, dtype=dtype, device=device) if grad is None else grad
                 for grad, (width, dtype) in zip(grads, ctx.grad_likes)]
        pack_dtype = _common_dtype(grads)
        packed = _spread_rows(torch.cat([grad.to(pack_dtype) for grad in grads], dim=1), ctx.counts)
        local = packed.new_empty(max(ctx.counts), packed.shape[1])
        with naming_collective_failures("MoEBlock (sequence-parallel) backward reduce-scatter of [dx | dtopk_weights "
                                        "| dshared_gate]", ctx.group):
            reduce_scatter_single(local, packed, ctx.group)
        local = local[:ctx.counts[ctx.rank]]
        out, offset = [], 0
        for width, dtype in ctx.grad_likes:
            out.append(local[:, offset:offset + width].to(dtype))
            offset += width
        grad_shared = out[2] if ctx.has_shared_gate else None
        return None, None, out[0], out[1], None, grad_shared


class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Leaves the partial region back to token-sharded outputs.

    forward:  ONE reduce-scatter (sum) of the partial output over all T tokens -> this rank's rows.
    backward: ONE all-gather of dy of this rank's rows -> dy for all T tokens.
    """

    @staticmethod
    def forward(ctx, group, counts, partial_output):
        ctx.group, ctx.counts = group, counts
        rank = dist.get_rank(group)
        spread = _spread_rows(partial_output, counts)
        local = spread.new_empty(max(counts), spread.shape[1])
        with naming_collective_failures("MoEBlock (sequence-parallel) forward reduce-scatter of the partial output",
                                        group):
            reduce_scatter_single(local, spread, group)
        return local[:counts[rank]]

    @staticmethod
    def backward(ctx, grad_local):
        padded = _pad_rows(grad_local.contiguous(), max(ctx.counts))
        gathered = padded.new_empty(len(ctx.counts) * max(ctx.counts), padded.shape[1])
        with naming_collective_failures("MoEBlock (sequence-parallel) backward all-gather of dy", ctx.group):
            all_gather_single(gathered, padded, group=ctx.group)
        return None, None, _drop_padding(gathered, ctx.counts)


def gather_from_sequence_parallel_region(hidden_states, topk_weights, topk_ids, shared_gate, group,
                                         tokens_per_rank=None):
    """Local tokens' [x, topk_weights, topk_ids, shared_gate or None] -> the same for all tokens.

    See GatherFromSequenceParallelRegion; the identity without a group of 2+.
    """
    counts = check_tokens_per_rank(tokens_per_rank, hidden_states.shape[0], group)
    if not communicates(group):
        return hidden_states, topk_weights, topk_ids, shared_gate
    return GatherFromSequenceParallelRegion.apply(group, counts, hidden_states, topk_weights, topk_ids, shared_gate)


def reduce_scatter_to_sequence_parallel_region(partial_output, group, tokens_per_rank=None):
    """Partial output for all tokens -> complete output for this rank's tokens.

    See ReduceScatterToSequenceParallelRegion; the identity without a group of 2+.
    """
    if not communicates(group):
        return partial_output
    if tokens_per_rank is None:
        counts = [partial_output.shape[0] // group_size(group)] * group_size(group)
    else:
        counts = list(tokens_per_rank)
    return ReduceScatterToSequenceParallelRegion.apply(group, counts, partial_output)
