"""torch.ops.tpmoe.experts_cpu_forward / experts_cpu_backward: loading, fakes, autograd.

Layers: C++ kernels (csrc/experts_cpu_forward.cpp, experts_cpu_backward.cpp) -> the ops
(csrc/experts_cpu_ops.cpp) -> their fakes here (so torch.compile can trace a call) ->
ExpertsCpuFunction (autograd) -> experts_forward_native (routing + apply).
"""
import os

import torch
from torch.autograd.function import once_differentiable

from .._native import NativeExtensionMissing, native_ops

THREADINGS = ("auto", "experts", "gemm")
# TPMOE_CPU_DEV_BUILD=1 (development of csrc/experts_cpu_*.cpp only): the ops come from a
# JIT build of those files alone, under their own namespace so that it loads next to an
# installed tpmoe._C. Everything else uses tpmoe._C.
_DEV_BUILD = os.environ.get("TPMOE_CPU_DEV_BUILD", "0") == "1"
_NAMESPACE = "tpmoe_cpu_dev" if _DEV_BUILD else "tpmoe"
_FORWARD = f"{_NAMESPACE}::experts_cpu_forward"
_BACKWARD = f"{_NAMESPACE}::experts_cpu_backward"
_fakes_registered = False
_ops = None


def _op_exists(qualified_name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified_name, "CPU")
    except RuntimeError:  # "operator ... does not exist"
        return False


def _dev_build():
    """Development tool (TPMOE_CPU_DEV_BUILD=1): JIT-compiles csrc/experts_cpu_*.cpp alone into
    /tmp, with -fopenmp (without it at::parallel_for runs serially), for working on these
    kernels without rebuilding the whole of tpmoe._C."""
    import glob

    from torch.utils.cpp_extension import load

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    build_directory = os.environ.get("TPMOE_CPU_DEV_BUILD_DIR", "/tmp/tpmoe_cpu_dev")
    os.makedirs(build_directory, exist_ok=True)
    load(name="tpmoe_cpu_dev", sources=sorted(glob.glob(os.path.join(csrc, "experts_cpu*.cpp"))),
         extra_cflags=["-O3", "-fopenmp", f"-DTPMOE_EXPERTS_CPU_NAMESPACE={_NAMESPACE}"], extra_ldflags=["-fopenmp"],
         extra_include_paths=[csrc], build_directory=build_directory, is_python_module=False)


def cpu_ops():
    """torch.ops.tpmoe with the expert ops registered (loads tpmoe._C); raises
    NativeExtensionMissing with the build command where they are not built."""
    global _ops
    if _ops is not None:
        return _ops
    if not _op_exists(_FORWARD):
        if _DEV_BUILD:
            _dev_build()
        else:
            native_ops()  # raises NativeExtensionMissing, with the build command, where it is not built
            if not _op_exists(_FORWARD):
                raise NativeExtensionMissing(
                    "tpmoe._C was built without the CPU expert ops (csrc/experts_cpu_*.cpp); rebuild it with "
                    "`pip install --no-build-isolation -e .`")
    _register_fakes()
    _ops = getattr(torch.ops, _NAMESPACE)
    return _ops


def release_workspace() -> int:
    """Frees the scratch buffer the CPU forward keeps between calls (the largest one a call
    needed: gathered rows, activation and gate_up output, e.g. ~140 MB for 2048 tokens of the
    Qwen3-30B-A3B layer) and returns its size in bytes; the next call allocates it again.
    0 where nothing was kept or the ops are not built."""
    if not cpu_ops_available():
        return 0
    return int(cpu_ops().experts_cpu_release_workspace())


def cpu_ops_available() -> bool:
    try:
        cpu_ops()
    except NativeExtensionMissing:
        return False
    return True


def _register_fakes():
    global _fakes_registered
    if _fakes_registered or not _op_exists(_FORWARD):
        return
    _fakes_registered = True

    @torch.library.register_fake(_FORWARD)
    def _forward_fake(hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights, b_gate_up,
                      b_down, activation, layout, gated, alpha, limit, threading, save_gate_up):
        gate_up_cols = w_gate_up.shape[2] if layout == "gpt_oss" else w_gate_up.shape[1]
        rows = sorted_pair_ids.shape[0] if save_gate_up else 0
        return hidden_states.new_empty(hidden_states.shape), hidden_states.new_empty((rows, gate_up_cols))

    @torch.library.register_fake(_BACKWARD)
    def _backward_fake(grad_output, hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights,
                       b_gate_up, b_down, gate_up_sorted, activation, layout, gated, alpha, limit, threading,
                       output_mask):
        def maybe(needed, like):
            return like.new_empty(like.shape) if needed and like is not None else like.new_empty((0,)) \
                if like is not None else hidden_states.new_empty((0,))
        return (maybe(output_mask[0], hidden_states), maybe(output_mask[1], w_gate_up), maybe(output_mask[2], w_down),
                maybe(output_mask[3], topk_weights), maybe(output_mask[4], b_gate_up),
                maybe(output_mask[5], b_down))


# The ops may already be loaded (tpmoe._C imported by someone else, or torch importing this
# module for an op's fake through set_python_module): then their fakes are needed now.
_register_fakes()


class ExpertsCpuFunction(torch.autograd.Function):
    """y = sum_k w[t,k] expert_k(x_t) on CPU; gradients for x, both weights, topk_weights and
    both biases. Saves the raw gate_up GEMM output [T*K, R] (see experts_cpu_backward.cpp
    for what is recomputed instead)."""

    @staticmethod
    def forward(ctx, hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, sorted_pair_ids,
                expert_offsets, activation, layout, gated, alpha, limit, threading):
        ops = cpu_ops()
        needs_grad = any(ctx.needs_input_grad[:6])
        output, gate_up_sorted = ops.experts_cpu_forward(
            hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights, b_gate_up, b_down,
            activation, layout, gated, alpha, limit, threading, needs_grad)
        if needs_grad:
            ctx.save_for_backward(hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, sorted_pair_ids,
                                  expert_offsets, gate_up_sorted)
            ctx.options = (activation, layout, gated, alpha, limit, threading)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, sorted_pair_ids, expert_offsets,
         gate_up_sorted) = ctx.saved_tensors
        output_mask = [bool(flag) for flag in ctx.needs_input_grad[:6]]
        grads = cpu_ops().experts_cpu_backward(
            grad_output.contiguous(), hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights,
            b_gate_up, b_down, gate_up_sorted, *ctx.options, output_mask)
        grads = [grad if needed else None for grad, needed in zip(grads, output_mask)]
        return (*grads, None, None, None, None, None, None, None, None)


def _sorted_pairs(topk_ids: torch.Tensor, num_experts: int):
    """(sorted_pair_ids, expert_offsets) from tpmoe.routing.align."""
    from ..routing import align

    routing = align(topk_ids, num_experts)
    return routing.sorted_pair_ids, routing.expert_offsets


def experts_forward_native(hidden_states, w_gate_up, w_down, topk_ids, topk_weights, *, activation, layout, gated,
                           b_gate_up, b_down, alpha, limit, threading="auto"):
    """The native CPU path of tpmoe.fused_experts (inputs already validated by it)."""
    if threading not in THREADINGS:
        raise ValueError(f"threading: expected one of {THREADINGS}, got {threading!r}")
    sorted_pair_ids, expert_offsets = _sorted_pairs(topk_ids, w_gate_up.shape[0])
    return ExpertsCpuFunction.apply(hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down,
                                    sorted_pair_ids, expert_offsets, activation, layout, gated, float(alpha),
                                    float(limit), threading)
