"""The work a benchmark gives every implementation, and the two yardsticks it is measured
against; shared by `tpmoe bench` and the scripts in benchmarks/.

  FLOPs          of the routed experts (and of a whole block: router and shared expert too)
  routing        tpmoe.route's twin on random logits, for the scripts that time the experts alone
  dense          one GEMM [T*K, H] x [H, N] with the same FLOPs: the compute ceiling
  weight read    one pass over as many experts' weights as the routing touches: the
                 bandwidth floor
"""
import math
from typing import Optional, Sequence

import torch

from ..config import MoEConfig


def routed_expert_flops(config: MoEConfig, num_tokens: int, intermediate: Optional[int] = None) -> int:
    """FLOPs of one forward of the routed experts (gate/up and down GEMMs of every (token, k) pair)."""
    intermediate = config.intermediate_size if intermediate is None else intermediate
    gate_up = 2 if config.gated else 1
    return 2 * num_tokens * config.top_k * config.hidden_size * (gate_up + 1) * intermediate


def block_forward_flops(config: MoEConfig, num_tokens: int, intermediate: Optional[int] = None,
                        shared: Optional[int] = None) -> int:
    """FLOPs of one forward of the block (router, routed experts, shared expert) on the given
    intermediate sizes (default the config's: a rank passes its shard's)."""
    shared = config.shared_intermediate_size if shared is None else shared
    gate_up = 2 if config.gated else 1
    shared_flops = 2 * num_tokens * config.hidden_size * (gate_up + 1) * shared
    router = 2 * num_tokens * config.hidden_size * config.num_experts
    return routed_expert_flops(config, num_tokens, intermediate) + shared_flops + router


def random_routing(config: MoEConfig, num_tokens: int, *, generator: Optional[torch.Generator] = None,
                   device=None):
    """(topk_ids [T, K] int64, topk_weights [T, K] float32): softmax top-k of random logits,
    renormalised, by tpmoe.route's plain-PyTorch twin (the same ids and weights): a benchmark of
    the experts alone must not need the native routing op on its device, which a GPU check
    builds and tests in a step of its own."""
    from ..routing_torch import route_torch
    logits = torch.randn(num_tokens, config.num_experts, generator=generator, device=device)
    topk_weights, topk_ids = route_torch(logits, config.top_k, renormalize=True)
    return topk_ids, topk_weights


def dense_step(config: MoEConfig, num_tokens: int, forward_flops: int, mode: str, dtype: torch.dtype, device):
    """One GEMM [T*K, H] x [H, N] with N chosen for `forward_flops`: the compute ceiling at this T
    (mode "train": forward and backward, 3x the FLOPs)."""
    rows = num_tokens * config.top_k
    columns = max(1, math.ceil(forward_flops / (2 * rows * config.hidden_size)))
    a = torch.randn(rows, config.hidden_size, dtype=dtype, device=device)
    b = torch.randn(config.hidden_size, columns, dtype=dtype, device=device)
    if mode == "fwd":
        return lambda: a @ b
    a.requires_grad_(True)
    b.requires_grad_(True)
    grad = torch.randn(rows, columns, dtype=dtype, device=device)

    def step():
        a.grad = b.grad = None
        (a @ b).backward(grad)
    return step


def touched_experts(topk_ids: torch.Tensor) -> int:
    """How many distinct experts the routing picks."""
    return torch.unique(topk_ids).numel()


def touched_bytes(topk_ids: torch.Tensor, *expert_tensors: torch.Tensor) -> int:
    """The bytes of the touched experts' slices of `expert_tensors` [E, ...]."""
    touched = touched_experts(topk_ids)
    return sum(tensor[0].nbytes * touched for tensor in expert_tensors if tensor.numel())


def weight_read_step(topk_ids: torch.Tensor, expert_tensors: Sequence[torch.Tensor], mode: str,
                     whole_tensors: Sequence[torch.Tensor] = ()):
    """The bandwidth floor: a read of the touched experts' slices of `expert_tensors` [E, ...]
    (plus `whole_tensors`, e.g. a shared expert, entirely); mode "train": two reads (forward,
    backward) and a write of their gradients. The same bytes in one contiguous pass per tensor
    (experts 0..n-1): a per-expert loop would add a call overhead per expert to the floor and
    flatter the ratios."""
    touched = touched_experts(topk_ids)
    slabs = [tensor.detach()[:touched] for tensor in expert_tensors if tensor.numel()]
    slabs += [tensor.detach() for tensor in whole_tensors if tensor.numel()]
    if mode == "fwd":
        return lambda: [slab.sum() for slab in slabs]
    grads = [torch.empty_like(slab) for slab in slabs]

    def step():
        for slab, grad in zip(slabs, grads):
            slab.sum()
            slab.sum()
            grad.zero_()
    return step
