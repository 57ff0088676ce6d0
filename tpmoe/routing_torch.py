"""Plain-PyTorch twins of the native routing ops: the test oracle of `tpmoe.routing`.

`route_torch` and `align_torch` take the arguments of `tpmoe.route` / `tpmoe.align` and give
the same outputs: the same ids and metadata bit for bit, the same weights up to the final
rounding. They compute scores in float64 and round once to the output dtype, as the native
kernels do, and rank with a stable descending sort (equal scores: lower expert index first).
They do not validate their inputs; the public functions do.
"""
from typing import NamedTuple, Optional, Tuple

import torch

# DeepSeek-V3 renormalises with this epsilon (w / (sum + 1e-20)).
RENORM_EPSILON = 1e-20


class AlignResult(NamedTuple):
    """Routing metadata of `align`: the T*K (token, expert) pairs grouped by expert.

    A pair index is p = t * K + k. Shapes depend on the input shapes only (M is a bound).
    """

    sorted_pair_ids: torch.Tensor    # [T*K] int32, pairs stably sorted by expert
    tokens_per_expert: torch.Tensor  # [E] int64
    expert_offsets: torch.Tensor     # [E+1] int64, row ranges into sorted_pair_ids
    sorted_ids_padded: torch.Tensor  # [M] int32, each expert padded to block_m rows; pad = T*K
    padded_offsets: torch.Tensor     # [E+1] int64, start of each expert's padded segment
    block_expert: torch.Tensor       # [ceil(M / block_m)] int32, -1 at/after num_padded
    num_padded: torch.Tensor         # [1] int64, rows used in sorted_ids_padded


def weight_dtype_for(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def padded_rows_bound(pairs, num_experts: int, block_m: int):
    """Rows of sorted_ids_padded: at most min(E, T*K) experts each add at most block_m - 1 pads."""
    # torch.sym_min keeps a symbolic T*K symbolic (torch.compile with dynamic shapes); plain ints
    # take min(): torch 2.11's Dynamo cannot trace torch.sym_min of two ints in an autograd.Function.
    fewer = min(num_experts, pairs) if isinstance(pairs, int) else torch.sym_min(num_experts, pairs)
    return pairs + fewer * (block_m - 1)


def empty_align_outputs(topk_ids, num_experts, block_m):
    """The seven AlignResult tensors, uninitialised, with the shapes every implementation gives: the
    fake of the ops (torch.compile), and the outputs the Triton align writes whole. It lives here,
    beside AlignResult, and not in tpmoe.routing: the Triton align and its op allocate with it, and
    tpmoe.routing calls down into them, so importing it from there would be an import circle."""
    pairs = topk_ids.numel()
    padded_rows = padded_rows_bound(pairs, num_experts, block_m)
    int32 = dict(dtype=torch.int32, device=topk_ids.device)
    int64 = dict(dtype=torch.int64, device=topk_ids.device)
    return (
        torch.empty((pairs,), **int32),
        torch.empty((num_experts,), **int64),
        torch.empty((num_experts + 1,), **int64),
        torch.empty((padded_rows,), **int32),
        torch.empty((num_experts + 1,), **int64),
        torch.empty(((padded_rows + block_m - 1) // block_m,), **int32),
        torch.empty((1,), **int64),
    )


def _descending_order(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def selection_scores(
    router_logits: torch.Tensor, scoring: str, correction_bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """The float64 score experts are ranked by. softmax is monotone, so ranking by the logit
    ranks by the probability, exactly (and without depending on how exp rounds)."""
    logits64 = router_logits.double()
    if scoring == "sigmoid_group":
        scores = torch.sigmoid(logits64)
        if correction_bias is not None:
            scores = scores + correction_bias.double()
        return scores
    return logits64


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    correction_bias: Optional[torch.Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
) -> torch.Tensor:
    """topk_ids [T, K] int64 in descending score order, ties to the lower expert index."""
    scores = selection_scores(router_logits, scoring, correction_bias)
    num_tokens, num_experts = scores.shape
    if scoring == "sigmoid_group" and n_group > 1:
        grouped = scores.view(num_tokens, n_group, num_experts // n_group)
        # The DeepSeek-V3 group score: the sum of the two best scores of the group.
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        kept_groups = _descending_order(group_scores)[:, :topk_group]
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
        expert_kept = kept.repeat_interleave(num_experts // n_group, dim=1)
        scores = scores.masked_fill(~expert_kept, float("-inf"))
        # A dropped expert must never rank above a kept one, NaN included.
        order = torch.sort(expert_kept.to(torch.int8), dim=-1, descending=True, stable=True).indices
        ranked = _descending_order(scores.gather(1, order))
        return order.gather(1, ranked)[:, :top_k]
    return _descending_order(scores)[:, :top_k]


def route_weights(
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    routed_scaling_factor: float = 1.0,
) -> torch.Tensor:
    """The weight formula given the selected ids, in float64, differentiable w.r.t. the logits."""
    logits64 = router_logits.double()
    if scoring == "softmax":
        weights = torch.softmax(logits64, dim=-1).gather(1, topk_ids)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif scoring == "topk_softmax":
        # Already sums to one: renormalize changes nothing.
        weights = torch.softmax(logits64.gather(1, topk_ids), dim=-1)
    else:
        weights = torch.sigmoid(logits64).gather(1, topk_ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPSILON)
    return weights * routed_scaling_factor


def route_torch(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    correction_bias: Optional[torch.Tensor] = None,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, K] float32 (float64 for float64 logits), topk_ids [T, K] int64)."""
    with torch.no_grad():
        topk_ids = select_experts(
            router_logits, top_k, scoring=scoring, correction_bias=correction_bias,
            n_group=n_group, topk_group=topk_group,
        )
    weights = route_weights(
        router_logits, topk_ids, scoring=scoring, renormalize=renormalize,
        routed_scaling_factor=routed_scaling_factor,
    )
    return weights.to(weight_dtype_for(router_logits.dtype)), topk_ids


def align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int = 1) -> AlignResult:
    device = topk_ids.device
    expert_of_pair = topk_ids.reshape(-1).long()
    pairs = expert_of_pair.numel()
    # A stable sort keeps pair order within an expert.
    sorted_pair_ids = torch.sort(expert_of_pair, stable=True).indices
    tokens_per_expert = torch.bincount(expert_of_pair, minlength=num_experts)[:num_experts]
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    expert_offsets[1:] = torch.cumsum(tokens_per_expert, dim=0)
    padded_counts = (tokens_per_expert + block_m - 1) // block_m * block_m
    padded_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    padded_offsets[1:] = torch.cumsum(padded_counts, dim=0)
    num_padded = padded_offsets[-1:].clone()

    padded_rows = padded_rows_bound(pairs, num_experts, block_m)
    sorted_ids_padded = torch.full((padded_rows,), pairs, dtype=torch.int32, device=device)
    sorted_experts = expert_of_pair[sorted_pair_ids]
    rank_in_expert = torch.arange(pairs, device=device) - expert_offsets[sorted_experts]
    sorted_ids_padded[padded_offsets[sorted_experts] + rank_in_expert] = sorted_pair_ids.to(torch.int32)

    num_blocks = (padded_rows + block_m - 1) // block_m
    block_start = torch.arange(num_blocks, device=device) * block_m
    expert_of_block = torch.searchsorted(padded_offsets, block_start, right=True) - 1
    block_expert = torch.where(block_start < num_padded, expert_of_block, -1).to(torch.int32)
    return AlignResult(
        sorted_pair_ids.to(torch.int32), tokens_per_expert, expert_offsets, sorted_ids_padded,
        padded_offsets, block_expert, num_padded,
    )
