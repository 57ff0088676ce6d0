"""The contract of tpmoe.fused_experts, the same on every backend: the output and every gradient
against the loop-style reference (tpmoe.reference), on the cases of tests/support/experts_cases.py.

Backends: "cpu" (the native ops of tpmoe._C); "torch" (backend="cpu" with the native ops off,
TPMOE_SKIP_NATIVE=1: the plain-PyTorch twin that runs where tpmoe._C is not built); "triton"
(on CPU under TRITON_INTERPRET=1, which conftest.py sets when there is no GPU).
Tolerances (tests/support/tolerances.py): float64 within 1e-12 and fp32 within 1e-5 relative of the
float64 reference. fp16/bf16 (within twice the error of a same-dtype PyTorch run) are tested per
path, on the cases each was tuned on: test_fused_experts_cpu.py (native and plain-PyTorch),
test_cpu_kernels.py, test_triton_fused.py. That bound is a ratio of two rounding errors: at
the clamps of the gated-only activations a single rounding that crosses a clamp decides it, so
whether a case passes depends on its data: each path keeps the cases (and seeds) it is checked on.
"""
import importlib.util
import os
from typing import Callable, NamedTuple

import pytest
import torch

import tpmoe
from tpmoe._native import native_available, use_native_ops
from tpmoe.reference import reference_experts

from support.experts_cases import CASES, case_id, case_inputs, case_options, run_with_grads
from support.tolerances import assert_fp32_close

_TRITON_RUNS = importlib.util.find_spec("triton") is not None and (
    os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available())
pytestmark = [
    # The Triton interpreter's tl.sigmoid evaluates exp(-x) in numpy, which warns when it reaches
    # inf for x << 0 (the gated-only activations' large inputs); 1 / (1 + inf) = 0 is the right result.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
    # The "torch" backend's one warning per process (tested in test_native_fallback.py).
    pytest.mark.filterwarnings("ignore::tpmoe._native.NativeFallbackWarning"),
]
# Blocks of 16, so that every Triton loop over H, I and rows runs several trips on these
# small shapes (only the Triton path reads the variable).
SMALL_TRITON_BLOCKS = "BLOCK_M=16,BLOCK_N=16,BLOCK_K=16"


class Backend(NamedTuple):
    fused_experts: Callable
    device: str


@pytest.fixture(params=[
    pytest.param("cpu", marks=pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")),
    "torch",
    pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(
        not _TRITON_RUNS, reason="needs triton, and a GPU or TRITON_INTERPRET=1 (set by conftest.py)")]),
])
def backend(request, monkeypatch):
    name = request.param
    if name == "torch":
        monkeypatch.setenv("TPMOE_SKIP_NATIVE", "1")
        assert not use_native_ops()
    selected = "triton" if name == "triton" else "cpu"
    device = "cuda" if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    return Backend(lambda *args, **kwargs: tpmoe.fused_experts(*args, backend=selected, **kwargs), device)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference_fp32_and_fp64(case, backend, seed, monkeypatch):
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out)
    # float64: the paths differ from the reference only in summation order.
    out64, grads64 = run_with_grads(backend.fused_experts, inputs, options, grad_out, torch.float64, backend.device)
    assert_fp32_close(out64, ref_out, "output fp64", rtol=1e-12)
    assert set(grads64) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert_fp32_close(grads64[name], grad, f"d{name} fp64", rtol=1e-12)
    monkeypatch.setenv("TPMOE_TRITON_CONFIG", SMALL_TRITON_BLOCKS)
    out32, grads32 = run_with_grads(backend.fused_experts, inputs, options, grad_out, torch.float32, backend.device)
    assert out32.dtype == torch.float32
    assert_fp32_close(out32, ref_out, "output fp32")
    for name, grad in ref_grads.items():
        assert grads32[name].dtype == torch.float32, name
        assert_fp32_close(grads32[name], grad, f"d{name} fp32")
