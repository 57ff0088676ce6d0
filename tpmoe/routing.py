"""Routing: which experts each token goes to (`route`) and the metadata that groups the
(token, expert) pairs by expert for the grouped GEMMs (`align`).

Both check their arguments first (the messages name the argument, what was expected and
what came), then run:
- `route`: the native op `torch.ops.tpmoe.route` (csrc/, C++ on CPU, CUDA on GPU), or, where
  tpmoe._C is not built or has no kernel for the tensors' device (a build without nvcc), its
  plain-PyTorch twin (tpmoe.routing_torch; the decision is tpmoe._native.use_native_ops);
- `align`: on CUDA tensors the Triton kernels (`torch.ops.tpmoe.triton_align`,
  tpmoe/triton/align.py), the one GPU align, with or without tpmoe._C; elsewhere the C++ CPU
  op `torch.ops.tpmoe.align`, or its twin without tpmoe._C.
This module registers for the native ops what torch needs around them: fake (meta)
implementations, so `torch.compile` traces them, and the autograd formula of `route`.
"""
import math
from typing import Optional, Tuple

import torch

from ._native import on_load, use_native_ops
from .config import SCORINGS
from .routing_torch import (AlignResult, align_torch, empty_align_outputs, padded_rows_bound, route_torch,
                            weight_dtype_for)

__all__ = ["AlignResult", "align", "route"]

_LOGIT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ID_DTYPES = (torch.int32, torch.int64)
# Pair indices and the padding sentinel T*K are stored as int32.
_MAX_PAIRS = 2**31 - 1

# ---------------------------------------------------------------------------------------
# The fake implementations and the autograd formula of the native ops
# ---------------------------------------------------------------------------------------


def _route_fake(router_logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group,
                routed_scaling_factor):
    num_tokens = router_logits.shape[0]
    topk_weights = router_logits.new_empty((num_tokens, top_k), dtype=weight_dtype_for(router_logits.dtype))
    topk_ids = router_logits.new_empty((num_tokens, top_k), dtype=torch.int64)
    return topk_weights, topk_ids


def _route_setup_context(ctx, inputs, output):
    router_logits, _top_k, scoring, renormalize, _bias, _n_group, _topk_group, routed_scaling_factor = inputs
    _topk_weights, topk_ids = output
    ctx.save_for_backward(router_logits, topk_ids)
    ctx.scoring = scoring
    ctx.renormalize = renormalize
    ctx.routed_scaling_factor = routed_scaling_factor


def _route_backward(ctx, grad_topk_weights, _grad_topk_ids):
    """d(weights)/d(logits) with the ids held fixed, written out so that it is itself made of
    differentiable torch ops (double backward) and traceable. Computed in float64, as the
    forward is, and returned in the dtype of the logits."""
    router_logits, topk_ids = ctx.saved_tensors
    logits64 = router_logits.double()
    grad_weights = grad_topk_weights.double() * ctx.routed_scaling_factor
    if ctx.scoring == "topk_softmax":
        probs = torch.softmax(logits64.gather(1, topk_ids), dim=-1)
        grad_selected = probs * (grad_weights - (grad_weights * probs).sum(dim=-1, keepdim=True))
        grad_logits = torch.zeros_like(logits64).scatter_add(1, topk_ids, grad_selected)
        return grad_logits.to(router_logits.dtype), None, None, None, None, None, None, None

    if ctx.scoring == "softmax":
        scores = torch.softmax(logits64, dim=-1)
        epsilon = 0.0
    else:
        scores = torch.sigmoid(logits64)
        epsilon = 1e-20
    if ctx.renormalize:
        # w = s_sel / (sum(s_sel) + eps): dL/ds_j = (g_j - sum_i g_i w_i) / (sum + eps).
        selected = scores.gather(1, topk_ids)
        total = selected.sum(dim=-1, keepdim=True) + epsilon
        weights = selected / total
        grad_weights = (grad_weights - (grad_weights * weights).sum(dim=-1, keepdim=True)) / total
    grad_scores = torch.zeros_like(logits64).scatter_add(1, topk_ids, grad_weights)
    if ctx.scoring == "softmax":
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(dim=-1, keepdim=True))
    else:
        grad_logits = grad_scores * scores * (1 - scores)
    return grad_logits.to(router_logits.dtype), None, None, None, None, None, None, None


@on_load
def _register_python_side() -> None:
    torch.library.register_fake("tpmoe::route", _route_fake)
    torch.library.register_fake("tpmoe::align", empty_align_outputs)
    torch.library.register_autograd("tpmoe::route", _route_backward, setup_context=_route_setup_context)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _check_route_args(router_logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group,
                      routed_scaling_factor) -> None:
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits: expected a torch.Tensor, got {type(router_logits).__name__}")
    if router_logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"router_logits: expected dtype float32, float64, float16 or bfloat16, got {router_logits.dtype}")
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits: expected a 2-D tensor [T, E], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if num_experts < 1:
        raise ValueError(f"router_logits: expected at least one expert column, got shape {tuple(router_logits.shape)}")
    _check_int("top_k", top_k, 1)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected <= the number of experts ({num_experts}), got {top_k}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected a bool, got {type(renormalize).__name__} {renormalize!r}")
    _check_int("n_group", n_group, 1)
    _check_int("topk_group", topk_group, 1)
    if num_experts % n_group != 0:
        raise ValueError(f"n_group: expected a divisor of the number of experts ({num_experts}), got {n_group}")
    if topk_group > n_group:
        raise ValueError(f"topk_group: expected <= n_group ({n_group}), got {topk_group}")
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f"routed_scaling_factor: expected a float, got {type(routed_scaling_factor).__name__}")
    if not math.isfinite(routed_scaling_factor):
        raise ValueError(f"routed_scaling_factor: expected a finite number, got {routed_scaling_factor}")
    if scoring == "sigmoid_group":
        kept_experts = topk_group * (num_experts // n_group)
        if top_k > kept_experts:
            raise ValueError(
                f"top_k: expected <= the experts of the kept groups (topk_group * E / n_group = {kept_experts}), "
                f"got {top_k}")
    else:
        if n_group != 1 or topk_group != 1:
            raise ValueError(
                f"n_group/topk_group: group-limited routing needs scoring='sigmoid_group', got n_group={n_group}, "
                f"topk_group={topk_group} with scoring={scoring!r}")
        if correction_bias is not None:
            raise ValueError(f"correction_bias: only scoring='sigmoid_group' uses it, got a tensor with "
                             f"scoring={scoring!r}")
    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor):
            raise TypeError(f"correction_bias: expected a torch.Tensor or None, got {type(correction_bias).__name__}")
        if not correction_bias.is_floating_point():
            raise TypeError(f"correction_bias: expected a floating dtype, got {correction_bias.dtype}")
        if tuple(correction_bias.shape) != (num_experts,):
            raise ValueError(f"correction_bias: expected shape ({num_experts},), got {tuple(correction_bias.shape)}")
        if correction_bias.device != router_logits.device:
            raise ValueError(f"correction_bias: expected device {router_logits.device} (that of router_logits), "
                             f"got {correction_bias.device}")


def _check_align_args(topk_ids, num_experts, block_m) -> None:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids: expected a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"topk_ids: expected dtype int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected a 2-D tensor [T, K], got shape {tuple(topk_ids.shape)}")
    _check_int("num_experts", num_experts, 1)
    _check_int("block_m", block_m, 1)
    if topk_ids.numel() >= _MAX_PAIRS:
        raise ValueError(f"topk_ids: expected T*K < 2**31 - 1 (pair ids are int32), got T*K = {topk_ids.numel()}")
    padded_rows = padded_rows_bound(topk_ids.numel(), num_experts, block_m)
    if padded_rows > _MAX_PAIRS:
        # The GPU kernels index the padded rows with int32 program ids (pid_m * BLOCK_M).
        raise ValueError(f"topk_ids: expected T*K + min(E, T*K) * (block_m - 1) <= 2**31 - 1 padded rows (row "
                         f"indices are int32), got {padded_rows} for T*K = {topk_ids.numel()}, E = {num_experts}, "
                         f"block_m = {block_m}")
    _check_ids_on_host(topk_ids, num_experts)


def _check_ids_on_host(topk_ids, num_experts) -> None:
    # The value check needs the data: done where it is free (CPU, eager). Under torch.compile
    # the native op checks on CPU; on CUDA the Triton kernel asserts (tpmoe/triton/align.py), as a
    # sync here would stall every MoE layer and break CUDA-graph capture.
    if topk_ids.device.type == "cpu" and not torch.compiler.is_compiling() and topk_ids.numel() > 0:
        low, high = topk_ids.min().item(), topk_ids.max().item()
        if low < 0 or high >= num_experts:
            raise ValueError(f"topk_ids: expected expert ids in [0, {num_experts}), got values in [{low}, {high}]")


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def route(
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
    """Selects top_k experts per token and their weights.

    router_logits [T, E] (float32/float16/bfloat16/float64) -> (topk_weights [T, K] float32
    (float64 for float64 logits), topk_ids [T, K] int64). The ids of a row are ordered by
    descending selection score, equal scores by the lower expert index. Scores are computed
    in float64 and rounded once.

    scoring: "softmax" (softmax over E, top-k; renormalize divides by the sum of the k),
    "topk_softmax" (top-k of the logits, softmax over the k: GPT-OSS), "sigmoid_group"
    (DeepSeek-V3: s = sigmoid(l), ranked by s + correction_bias within the topk_group best of
    n_group groups, a group scored by the sum of its two best; weights s, renormalised as
    s / (sum + 1e-20)). Every scoring multiplies the weights by routed_scaling_factor.

    The weights are differentiable w.r.t. router_logits; the ids are held fixed.
    """
    _check_route_args(router_logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group,
                      routed_scaling_factor)
    ops = use_native_ops(router_logits.device)
    if ops is None:
        return route_torch(router_logits, top_k, scoring=scoring, renormalize=renormalize,
                           correction_bias=correction_bias, n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=float(routed_scaling_factor))
    return ops.route(router_logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group,
                     float(routed_scaling_factor))


def uses_triton_align(device: torch.device) -> bool:
    """Whether `align` runs the Triton kernels for tensors on `device`: on CUDA, always (the one
    GPU align). The tests that count a GPU forward's launches on CPU, under the interpreter,
    switch it on there."""
    return device.type == "cuda"


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int = 1) -> AlignResult:
    """Groups the T*K (token, expert) pairs by expert; see `AlignResult` for the outputs.

    Pair p = t * K + k. Within an expert, pairs keep their order (a stable sort). Each
    expert's rows are padded to a multiple of block_m in sorted_ids_padded, whose length
    M = T*K + min(E, T*K) * (block_m - 1) depends on shapes only. CUDA tensors: the Triton
    kernels (one launch up to 4096 pairs, three past it; no host sync); CPU: the C++ op.
    """
    _check_align_args(topk_ids, num_experts, block_m)
    if uses_triton_align(topk_ids.device):
        from .triton import ops as triton_ops  # imports triton: only where it runs
        return AlignResult(*triton_ops.align(topk_ids, num_experts, block_m))
    ops = use_native_ops()
    if ops is None:
        return align_torch(topk_ids, num_experts, block_m)
    return AlignResult(*ops.align(topk_ids, num_experts, block_m))
