"""Expert parallelism (EP), alone or with tensor parallelism on the experts (EP x TP): the token
flow of one block (docs/design.md section 2).

Layout: EP rank e owns the contiguous experts [first_e, first_e + n_e) (tpmoe.sharding.
expert_ranges; uneven when P_ep does not divide E). With TP, the ranks of a TP group hold the
same tokens and the same experts, each expert's intermediate columns split over them as in TP
mode; an EP group holds one TP rank of each EP rank, so the P TP ranks run P identical token
exchanges side by side, each over its own EP group.

Forward, dropless (every (token, k) pair is computed; no capacity):

  route(x_local) -> topk_ids, topk_weights                              replicated router, local tokens
  pairs sorted by expert (stable) -> ONE all_to_all_single of the per-expert counts (int64)
  counts.tolist()                      the ONE host sync: all_to_all_single takes host split sizes
  ONE all_to_all_single of the sorted x rows (dispatch): rank e receives its experts' rows, by
      source rank, then by local expert; the ids are implied by that order and the counts
  [TP > 1: f]  fused_experts on the received rows (+ the shared expert on the local tokens)
  [TP > 1: g = ONE all-reduce of [expert rows | shared expert rows] in the TP group]
  ONE all_to_all_single back (combine) -> o [T, K, H], the unweighted output of each pair
  y = sum_k topk_weights[t, k] * o[t, k]   on the source rank, a dense sum over k in a fixed order

Here: the exchange (exchange_counts, dispatch_rows, combine_rows), tensors and groups in and out;
the experts between dispatch and combine, and the TP region around them, are the block's
(tpmoe.block.MoEBlock._expert_parallel_pairs): communication never calls back into the block.

Backward mirrors it (autograd through the same Functions): the combine's backward is the
dispatch of d o = topk_weights * dy, the TP f's backward ONE all-reduce of [d rows | d shared
input | d shared gate], the dispatch's backward the combine of d rows; dx sums its K pairs in
a fixed order (the backward of an expand). So per block: forward 3 all_to_all_single (+1
all_reduce with TP > 1), backward 2 all_to_all_single (+1 all_reduce with TP > 1).

Routing weights are applied on the source rank after the combine, not sent with the rows: the
gradient of a weight, dy . o, is then formed where the weight lives, only rows travel (no
second buffer for the weights, no gradient all-to-all of them), and the collective count stays
exact. The cost: autograd keeps the combined outputs o, [T * K, H] per block, for that
gradient. (weights_on_input blocks, Llama-4, scale the rows before the dispatch instead.)

Gradients: an expert's weights get every token routed to them, from every EP rank: complete
on their owner. The router, shared gate, routed down bias and shared expert see only their
rank's tokens: tpmoe.distributed.allreduce_router_grads sums them over the EP group once per
step for all blocks.
"""
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..sharding import expert_ranges
from .groups import communicates, group_rank, group_size, naming_collective_failures


class ExchangePlan(NamedTuple):
    """The host-side sizes of one block's exchange, known after the counts all-to-all."""
    order: torch.Tensor          # [T*K] pair ids (t * K + k) sorted by expert, stably: the dispatch order
    send_splits: List[int]       # rows sent to each EP rank (the pairs routed to its experts)
    recv_splits: List[int]       # rows received from each EP rank
    local_ids: torch.Tensor      # [sum(recv_splits)] the local expert (0..n_e-1) of each received row


def exchange_counts(topk_ids: torch.Tensor, num_experts: int, ep_group) -> ExchangePlan:
    """The pairs' dispatch order and split sizes. Communication: ONE all_to_all_single of int64
    counts (E sent, n_e per source received), then the one host sync of the EP forward."""
    ep_size, ep_rank = group_size(ep_group), group_rank(ep_group)
    ranges = expert_ranges(num_experts, ep_size)
    first, local_count = ranges[ep_rank]
    ids = topk_ids.reshape(-1)
    order = torch.argsort(ids, stable=True)
    # Counted into E slots by index_add_, not torch.bincount: bincount's CUDA kernel reads the ids'
    # min and max on the host first (two syncs), even with minlength; index_add_ reads nothing.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
    if communicates(ep_group):
        received = counts.new_empty(ep_size * local_count)
        with naming_collective_failures("MoEBlock (expert-parallel) forward all-to-all of the per-expert token "
                                        "counts", ep_group, "EP"):
            dist.all_to_all_single(received, counts, output_split_sizes=[local_count] * ep_size,
                                   input_split_sizes=[count for _, count in ranges], group=ep_group)
    else:
        received = counts
    # The one device-to-host copy of the EP forward (a sync on GPU): all_to_all_single needs its
    # split sizes as host ints, and so do the buffers it fills.
    host = torch.cat([counts, received]).tolist()
    sent, received_host = host[:num_experts], host[num_experts:]
    send_splits = [sum(sent[start:start + count]) for start, count in ranges]
    recv_splits = [sum(received_host[s * local_count:(s + 1) * local_count]) for s in range(ep_size)]
    # Received row j lies in segment (source rank, local expert) = divmod(segment, n_e), the first
    # whose running count exceeds j: found on the device from `received`, with the row count
    # known on the host, so neither a copy back nor a data-dependent shape (another sync).
    segment_ends = torch.cumsum(received, 0)
    rows = torch.arange(sum(recv_splits), device=ids.device)
    local_ids = torch.searchsorted(segment_ends, rows, right=True) % max(local_count, 1)  # none: no rows
    return ExchangePlan(order, send_splits, recv_splits, local_ids)


def _all_to_all_rows(rows: torch.Tensor, send_splits: List[int], recv_splits: List[int], group,
                     what: str) -> torch.Tensor:
    out = rows.new_empty(sum(recv_splits), *rows.shape[1:])
    with naming_collective_failures(what, group, "EP"):
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits,
                               group=group)
    return out


class AllToAllRows(torch.autograd.Function):
    """Rows to their EP ranks: forward ONE all_to_all_single with (send, recv) split sizes,
    backward ONE with them swapped (the gradient of a dispatch is a combine, and back)."""

    @staticmethod
    def forward(ctx, group, rows, send_splits, recv_splits, what, what_backward):
        ctx.group, ctx.send_splits, ctx.recv_splits, ctx.what_backward = group, send_splits, recv_splits, what_backward
        return _all_to_all_rows(rows, send_splits, recv_splits, group, what)

    @staticmethod
    def backward(ctx, grad_rows):
        # grad_rows is materialized (zeros where unused), so every rank joins the collective.
        return (None, _all_to_all_rows(grad_rows, ctx.recv_splits, ctx.send_splits, ctx.group, ctx.what_backward),
                None, None, None, None)


def _exchange(rows, send_splits, recv_splits, group, what, what_backward):
    if not communicates(group):
        return rows
    return AllToAllRows.apply(group, rows, send_splits, recv_splits, what, what_backward)


class Dispatched(NamedTuple):
    """What dispatch_rows received: this rank's experts' rows and how to send their outputs back."""
    rows: torch.Tensor           # [N, H] the received rows, by source rank, then by local expert
    plan: ExchangePlan           # the split sizes and dispatch order (plan.local_ids: each row's expert)
    num_tokens: int              # T and K of this rank's tokens, for combine_rows
    top_k: int


def dispatch_rows(hidden_states: torch.Tensor, topk_ids: torch.Tensor, *, num_experts: int, ep_group,
                  input_weights: Optional[torch.Tensor] = None) -> Dispatched:
    """This rank's tokens [T, H] and their ids [T, K] -> the rows of this rank's experts, from every
    EP rank. Forward: ONE all_to_all_single of the counts (exchange_counts, with the one host sync)
    and ONE of the rows; backward: ONE all_to_all_single of d rows (a combine). input_weights [T, K]
    (weights_on_input): each pair's row is scaled before it leaves."""
    num_tokens, top_k = topk_ids.shape
    hidden = hidden_states.shape[-1]
    plan = exchange_counts(topk_ids, num_experts, ep_group)
    # Pair rows through an expand: its backward sums each token's K pair gradients in a fixed order.
    pairs = hidden_states[:, None, :].expand(num_tokens, top_k, hidden)
    if input_weights is not None:
        pairs = pairs * input_weights[:, :, None].to(hidden_states.dtype)
    rows = pairs.reshape(num_tokens * top_k, hidden)[plan.order]
    received = _exchange(rows, plan.send_splits, plan.recv_splits, ep_group,
                         "MoEBlock (expert-parallel) forward all-to-all of the token rows (dispatch)",
                         "MoEBlock (expert-parallel) backward all-to-all of d rows (the dispatch's backward)")
    return Dispatched(received, plan, num_tokens, top_k)


def combine_rows(outputs: torch.Tensor, dispatched: Dispatched, ep_group) -> torch.Tensor:
    """The complete outputs [N, H] of the received rows -> o [T, K, H] on the tokens' own rank, in
    pair order (unweighted: the caller weights and sums over k). Forward ONE all_to_all_single,
    backward ONE (a dispatch of d o)."""
    plan = dispatched.plan
    combined = _exchange(outputs, plan.recv_splits, plan.send_splits, ep_group,
                         "MoEBlock (expert-parallel) forward all-to-all of the expert outputs (combine)",
                         "MoEBlock (expert-parallel) backward all-to-all of d outputs (the combine's backward)")
    # Back from expert order to pair order: a permutation, exact both ways.
    inverse = torch.empty_like(plan.order)
    inverse[plan.order] = torch.arange(plan.order.numel(), device=plan.order.device)
    return combined[inverse].view(dispatched.num_tokens, dispatched.top_k, outputs.shape[-1])
