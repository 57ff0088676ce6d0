"""torch.ops.tpmoe.experts_cpu_forward / experts_cpu_backward / experts_cpu_release_workspace /
experts_cpu_bf16_gemm_path / experts_cpu_bf16_kernel_max_rows: the ops and their fakes.

Layers: C++ kernels (csrc/experts_cpu_forward.cpp, experts_cpu_backward.cpp) -> the ops
(csrc/experts_cpu_ops.cpp, loaded with tpmoe._C by tpmoe._native.native_ops) -> their fakes
here (so torch.compile can trace a call) -> ExpertsCpuFunction (autograd.py) ->
fused_experts_cpu (routing + apply).
"""
import functools
import os

import torch

from .._native import NativeExtensionMissing, native_ops, on_load

# TPMOE_CPU_DEV_BUILD=1 (development of csrc/experts_cpu_*.cpp only): the ops come from a
# JIT build of those files alone, under their own namespace so that it loads next to an
# installed tpmoe._C. Everything else uses tpmoe._C.
_DEV_BUILD = os.environ.get("TPMOE_CPU_DEV_BUILD", "0") == "1"
_DEV_NAMESPACE = "tpmoe_cpu_dev"


def _dev_build():
    """Development tool (TPMOE_CPU_DEV_BUILD=1): JIT-compiles csrc/experts_cpu_*.cpp alone into
    /tmp, with -fopenmp (without it at::parallel_for runs serially), for working on these
    kernels without rebuilding the whole of tpmoe._C."""
    import glob

    from torch.utils.cpp_extension import load

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    build_directory = os.environ.get("TPMOE_CPU_DEV_BUILD_DIR", "/tmp/tpmoe_cpu_dev")
    os.makedirs(build_directory, exist_ok=True)
    load(name=_DEV_NAMESPACE, sources=sorted(glob.glob(os.path.join(csrc, "experts_cpu*.cpp"))),
         extra_cflags=["-O3", "-fopenmp", f"-DTPMOE_EXPERTS_CPU_NAMESPACE={_DEV_NAMESPACE}"], extra_ldflags=["-fopenmp"],
         extra_include_paths=[csrc], build_directory=build_directory, is_python_module=False)


def cpu_ops():
    """torch.ops.tpmoe (tpmoe._native.native_ops: raises NativeExtensionMissing, with the build
    command, where tpmoe._C is not built); under TPMOE_CPU_DEV_BUILD=1 the development build's
    namespace instead."""
    return _dev_build_ops() if _DEV_BUILD else native_ops()


@functools.cache
def _dev_build_ops():
    _dev_build()
    _register_fakes(_DEV_NAMESPACE)
    return getattr(torch.ops, _DEV_NAMESPACE)


def release_workspace() -> int:
    """Frees the scratch buffer the CPU forward keeps between calls (the largest one a call
    needed: gathered rows, activation and gate_up output, e.g. ~140 MB for 2048 tokens of the
    Qwen3-30B-A3B layer) and returns its size in bytes; the next call allocates it again.
    0 where nothing was kept or the ops are not built."""
    try:
        ops = cpu_ops()
    except NativeExtensionMissing:
        return 0
    return int(ops.experts_cpu_release_workspace())


BF16_GEMM_ENV = "TPMOE_CPU_BF16_GEMM"
BF16_GEMM_CHOICES = ("native", "widen", "auto")


def bf16_gemm_path() -> str:
    """The bf16 GEMM the native CPU expert ops run now: "native" (ATen's, or the AVX512-BF16
    kernel of csrc/experts_cpu_gemm.cpp) or "widen" (float32 GEMMs on tiles widened from bf16,
    csrc/experts_cpu_widen.cpp). TPMOE_CPU_BF16_GEMM = native | widen | auto forces it; auto
    (or unset) picks native where the CPU has a bf16 dot product. The ops read the variable at
    every call, so this answer holds while it is unchanged. ValueError on any other value;
    NativeExtensionMissing where tpmoe._C is not built."""
    value = os.environ.get(BF16_GEMM_ENV, "auto")
    if value not in BF16_GEMM_CHOICES:
        raise ValueError(f"{BF16_GEMM_ENV}: expected one of {', '.join(BF16_GEMM_CHOICES)} (or unset), got {value!r}")
    return str(cpu_ops().experts_cpu_bf16_gemm_path())


def bf16_kernel_max_rows() -> int:
    """On the "native" bf16 path, the most rows an expert may have to run tpmoe's AVX512-BF16
    GEMM (csrc/experts_cpu_gemm.cpp: it reads the weight in place); experts with more run
    ATen's (oneDNN). TPMOE_CPU_BF16_KERNEL_MAX_ROWS forces it (0: always ATen's); by default 4
    where oneDNN has AMX-BF16 (its GEMM then outruns the kernel past a few rows), else no bound
    (2**63 - 1). Read at every call, like the variable."""
    return int(cpu_ops().experts_cpu_bf16_kernel_max_rows())


def _register_fakes(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::experts_cpu_forward")
    def _forward_fake(hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights, b_gate_up,
                      b_down, activation, layout, gated, alpha, limit, threading, save_gate_up):
        gate_up_cols = w_gate_up.shape[2] if layout == "gpt_oss" else w_gate_up.shape[1]
        rows = sorted_pair_ids.shape[0] if save_gate_up else 0
        return hidden_states.new_empty(hidden_states.shape), hidden_states.new_empty((rows, gate_up_cols))

    @torch.library.register_fake(f"{namespace}::experts_cpu_backward")
    def _backward_fake(grad_output, hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights,
                       b_gate_up, b_down, gate_up_sorted, activation, layout, gated, alpha, limit, threading,
                       output_mask):
        def maybe(needed, like):
            return like.new_empty(like.shape) if needed and like is not None else like.new_empty((0,)) \
                if like is not None else hidden_states.new_empty((0,))
        return (maybe(output_mask[0], hidden_states), maybe(output_mask[1], w_gate_up), maybe(output_mask[2], w_down),
                maybe(output_mask[3], topk_weights), maybe(output_mask[4], b_gate_up),
                maybe(output_mask[5], b_down))


@on_load
def _register_python_side() -> None:
    _register_fakes("tpmoe")
