"""The launches of one MoE forward at decode (T = 1) on the GPU path, counted on CPU.

At T = 1 the expert weights a token touches take about 15.7 us to read on an H200 (Qwen3-30B-A3B,
bf16); a launch costs a few microseconds, so the forward's launch count is its floor.

Counting rule (tests/support/launch_counting.py): from the router logits to the output, every Triton
kernel launch, every ATen op that would launch a CUDA kernel (fills, copies, casts, reductions;
not allocations, views or metadata), and each C++ op of tpmoe._C as one launch (`tpmoe::route`:
its CUDA implementation is one kernel; on CPU the native op runs where a GPU would run its CUDA
twin). What the interpreter does to run a kernel on CPU is not counted, and the checks that read
ids on the host for CPU tensors only (skipped on CUDA, where the align kernel asserts) are off
(`run_as_on_a_gpu`). The router's nn.Linear is the model's GEMM: counted separately (one launch),
not in the budget.

The budget: route 1, align 1, gate_up 1, down 1, combine (the sum over k, cast to the output
dtype) 1 = 5.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.triton  # skipped where the kernels cannot run (conftest.py)

import tpmoe  # noqa: E402
from support.launch_counting import HostSyncGuard, LaunchCounter, run_as_on_a_gpu  # noqa: E402
from support.triton_problems import DEVICE  # noqa: E402

FORWARD_BUDGET = 5
# Qwen3-30B-A3B's routing (softmax, top-8, renormalised) over fewer experts, tiny hidden sizes.
NUM_EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 32, 8, 16, 8


def _decode_inputs(seed, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, HIDDEN, generator=generator).to(dtype)
    w_router = (torch.randn(NUM_EXPERTS, HIDDEN, generator=generator) / HIDDEN ** 0.5).to(dtype)
    w_gate_up = (torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=generator) / HIDDEN ** 0.5).to(dtype)
    w_down = (torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=generator) / INTERMEDIATE ** 0.5).to(dtype)
    return [t.to(DEVICE) for t in (x, w_router, w_gate_up, w_down)]


def _route(router_logits):
    return tpmoe.route(router_logits, TOP_K, scoring="softmax", renormalize=True)


def test_router_linear_is_one_gemm(seed):
    x, w_router, _, _ = _decode_inputs(seed)
    with torch.no_grad(), LaunchCounter() as counter:
        torch.nn.functional.linear(x, w_router)
    assert len(counter.launches) == 1, "the router's linear:\n" + counter.breakdown()


def test_route_and_align_are_two_launches(monkeypatch, seed):
    """Routing's share of the budget: the route kernel and the one-launch Triton align."""
    run_as_on_a_gpu(monkeypatch)
    x, w_router, _, _ = _decode_inputs(seed)
    router_logits = torch.nn.functional.linear(x, w_router)
    with torch.no_grad(), LaunchCounter() as counter:
        _, topk_ids = _route(router_logits)
        tpmoe.align(topk_ids, NUM_EXPERTS, 16)
    assert counter.launches == ["native:route", "triton:align_small_kernel"], (
        "route + align at T=1:\n" + counter.breakdown())


def test_decode_forward_within_the_launch_budget(monkeypatch, seed):
    run_as_on_a_gpu(monkeypatch)
    x, w_router, w_gate_up, w_down = _decode_inputs(seed)
    router_logits = torch.nn.functional.linear(x, w_router)
    with torch.no_grad(), LaunchCounter() as counter:
        topk_weights, topk_ids = _route(router_logits)
        y = tpmoe.fused_experts(x, w_gate_up, w_down, topk_ids, topk_weights, backend="triton")
    assert y.shape == x.shape and y.dtype == x.dtype
    assert len(counter.launches) <= FORWARD_BUDGET, (
        f"{len(counter.launches)} launches from the router logits to the output at T=1, budget "
        f"{FORWARD_BUDGET} (route, align, gate_up, down, combine):\n" + counter.breakdown())


def test_decode_forward_reads_nothing_on_the_host(monkeypatch, seed):
    """The same forward issues no host read of tensor data (each would sync the device per layer)."""
    run_as_on_a_gpu(monkeypatch)
    x, w_router, w_gate_up, w_down = _decode_inputs(seed)
    router_logits = torch.nn.functional.linear(x, w_router)
    with torch.no_grad(), HostSyncGuard():
        topk_weights, topk_ids = _route(router_logits)
        tpmoe.fused_experts(x, w_gate_up, w_down, topk_ids, topk_weights, backend="triton")
