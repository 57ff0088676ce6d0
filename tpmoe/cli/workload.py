"""The work a benchmark gives every implementation, and the two yardsticks it is measured
against; shared by `tpmoe bench` and the scripts in benchmarks/.

  FLOPs          of the routed experts (and of a whole block: router and shared expert too)
  routing        tpmoe.route's twin on random logits, for the scripts that time the experts alone
  dense          one GEMM [T*K, H] x [H, N] with the same FLOPs: the compute ceiling (in float32
                 where that is faster than the data's bf16/fp16, as on CPUs that emulate them)
  expert GEMMs   the experts' own GEMMs, expert by expert: the ceiling of their shapes
  weight read    one pass over as many experts' weights as the routing touches: the
                 bandwidth floor
"""
import functools
import math
import time
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


def ceiling_dtype(dtype: torch.dtype, device_type: str = "cpu") -> torch.dtype:
    """The dtype whose GEMM is the compute ceiling for `dtype` data: `dtype` itself, or float32
    where that is faster (a CPU without a bf16/fp16 dot product emulates them: 0.8 GFLOP/s
    against 164 for float32 on an AVX2-only AMD EPYC, issue 36; an implementation there may
    widen to float32, so float32's rate is what it can reach). Decided once per process from
    the better of 3 timed calls of a probe GEMM of each dtype (256 x 512 x 512: ~0.3 s where
    emulated, about a millisecond otherwise)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return dtype
    # One cache entry per (dtype, device type) however it is called: two probes of the same
    # pair could disagree where the two GEMMs run at about the same speed.
    return _probed_ceiling_dtype(dtype, device_type)


@functools.cache
def _probed_ceiling_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    def best_seconds(probe_dtype):
        a = torch.randn(256, 512, device=device_type).to(probe_dtype)
        b = torch.randn(512, 512, device=device_type).to(probe_dtype)
        times = []
        for _ in range(4):  # the first call warms up (allocations, library dispatch)
            if device_type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device_type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return dtype if best_seconds(dtype) <= best_seconds(torch.float32) else torch.float32


def dense_step(config: MoEConfig, num_tokens: int, forward_flops: int, mode: str, dtype: torch.dtype, device):
    """One GEMM [T*K, H] x [H, N] with N chosen for `forward_flops`: the compute ceiling at this T
    (mode "train": forward and backward, 3x the FLOPs), in `dtype` or in float32 where that is
    the faster GEMM on this device (ceiling_dtype); the step's `dtype` attribute says which."""
    rows = num_tokens * config.top_k
    columns = max(1, math.ceil(forward_flops / (2 * rows * config.hidden_size)))
    dtype = ceiling_dtype(dtype, torch.device(device if device is not None else "cpu").type)
    a = torch.randn(rows, config.hidden_size, dtype=dtype, device=device)
    b = torch.randn(config.hidden_size, columns, dtype=dtype, device=device)
    if mode == "fwd":
        def step():
            return a @ b
    else:
        a.requires_grad_(True)
        b.requires_grad_(True)
        grad = torch.randn(rows, columns, dtype=dtype, device=device)

        def step():
            a.grad = b.grad = None
            (a @ b).backward(grad)
    step.dtype = dtype
    return step


def expert_gemms_step(config: MoEConfig, topk_ids: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32,
                      device=None):
    """The routed experts' own GEMMs through torch, expert by expert at the row counts the routing
    gives each ([n_e, H] x [H, R], then [n_e, I] x [I, H]; mode "train": with their backward), in
    `dtype`, one weight pair shared by every expert so that it stays cache-warm: the compute
    ceiling of the expert GEMMs' own shapes. dense_step's one big GEMM is that of their FLOPs,
    which shapes of ~32 rows (Qwen3 at T = 512: 4096 routes over 128 experts) do not reach
    even in the vendor's GEMM."""
    rows_per_expert = [n for n in torch.bincount(topk_ids.flatten().cpu(), minlength=config.num_experts).tolist() if n]
    inter, gate_up = config.intermediate_size, (2 if config.gated else 1) * config.intermediate_size
    train = mode != "fwd"
    w_gate_up = torch.randn(config.hidden_size, gate_up, dtype=dtype, device=device, requires_grad=train)
    w_down = torch.randn(inter, config.hidden_size, dtype=dtype, device=device, requires_grad=train)
    xs = [torch.randn(n, config.hidden_size, dtype=dtype, device=device, requires_grad=train) for n in rows_per_expert]
    hs = [torch.randn(n, inter, dtype=dtype, device=device, requires_grad=train) for n in rows_per_expert]
    grads = [(torch.randn(n, gate_up, dtype=dtype, device=device), torch.randn(n, config.hidden_size, dtype=dtype,
                                                                             device=device)) for n in rows_per_expert]

    def step():
        for x, h, (grad_gate_up, grad_down) in zip(xs, hs, grads):
            gate_up_out, down_out = x @ w_gate_up, h @ w_down
            if train:
                torch.autograd.backward([gate_up_out, down_out], [grad_gate_up, grad_down])
    step.dtype = dtype
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
