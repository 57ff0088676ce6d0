"""The native CPU expert ops read no memory they did not write. Each test runs the op with every
uninitialised allocation NaN-filled: torch's deterministic mode with fill_uninitialized_memory
makes at::empty fill what it returns (NaN for floats, 0xFF bytes for the byte workspace, NaN
in any float view of it), and release_workspace() first makes the forward allocate its kept
workspace anew. A read of a byte nobody wrote then shows as NaN, deterministically, where it
otherwise depended on what the process had allocated before.

The defect this pins: ATen's bf16 GEMM (oneDNN with AMX on a native-bf16 Xeon) reads each row
of its left operand past K, up to K rounded up to 32 within the row stride, and multiplies
those values by zeros; the forward's gathered rows and activation carry 32 elements of
uninitialised row padding, so whole rows of the output and the saved gate_up came back NaN
(csrc/experts_cpu_forward.cpp now zeroes the padding). Run on both bf16 GEMM paths, with ATen
alone on the native one (TPMOE_CPU_BF16_KERNEL_MAX_ROWS=0, the hand-written kernel off), and
on float32 too. Without the fix the bf16 cases that reach ATen's GEMM fail (native in "gemm",
native-aten in both threadings) with 28-32 of 40 rows NaN, on the development Xeon; the
hand-written kernel (masked loads) and the widened GEMM read exactly K, and float32 GEMMs
were not seen to read past K."""
import pytest
import torch

from tpmoe._native import native_available
from tpmoe.cpu import bf16_gemm_path, cpu_ops, fused_experts_cpu, release_workspace
from tpmoe.reference import reference_experts
from tpmoe.routing import align

from support.experts_cases import cast, case_id, case_inputs, case_options, make_routing, run_with_grads
from support.tolerances import assert_fp32_close, assert_within_twice_same_dtype

pytestmark = pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")

# (name, TPMOE_CPU_BF16_GEMM, TPMOE_CPU_BF16_KERNEL_MAX_ROWS or None for the default).
# "native" by default splits the experts by rows between the hand-written kernel and ATen's where
# the CPU has AMX; "native-kernel" gives them all to the kernel.
GEMMS = [("native", "native", None), ("native-aten", "native", "0"), ("native-kernel", "native", str(2**62)),
         ("widen", "widen", None)]
DTYPES = (torch.float32, torch.bfloat16)

# H = 100 and I_p = 37: neither a multiple of 32, so the bf16 GEMM's K blocks overrun the rows
# of both GEMMs' left operands (by 28 and 27 elements). An expert without tokens, and gpt_oss.
CASES = [
    (40, 100, 37, 3, 2, "concatenated", True, "silu", True, "skip_last"),
    (23, 100, 37, 4, 2, "gpt_oss", True, "clamped_swiglu", True, "random"),
]


@pytest.fixture
def forced_gemm(request, monkeypatch):
    """The test's `gemm` parameter set in the environment for the test's duration."""
    name, path, kernel_rows = next(entry for entry in GEMMS if entry[0] == request.node.callspec.params["gemm"])
    monkeypatch.setenv("TPMOE_CPU_BF16_GEMM", path)
    if kernel_rows is None:
        monkeypatch.delenv("TPMOE_CPU_BF16_KERNEL_MAX_ROWS", raising=False)
    else:
        monkeypatch.setenv("TPMOE_CPU_BF16_KERNEL_MAX_ROWS", kernel_rows)
    assert bf16_gemm_path() == path
    return name


class poisoned_memory:
    """Context: every at::empty / torch.empty NaN-filled, and the kept workspace released so
    the next forward allocates it under that. Restores the deterministic settings on exit."""

    def __enter__(self):
        self.saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                      torch.utils.deterministic.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        release_workspace()
        # The mechanism itself: fresh memory reads as NaN (floats) and 0xFF (the workspace's bytes).
        assert torch.empty(64, dtype=torch.bfloat16).isnan().all()
        assert (torch.empty(64, dtype=torch.uint8) == 255).all()
        return self

    def __exit__(self, *exc):
        enabled, warn_only, fill = self.saved
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        release_workspace()  # no NaN-filled workspace left to later tests (they would be right anyway)
        return False


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threading", ("experts", "gemm"))
@pytest.mark.parametrize("gemm", [entry[0] for entry in GEMMS])
def test_saved_gate_up_is_the_exact_sum_on_poisoned_memory(gemm, threading, dtype, forced_gemm, seed):
    # Small-integer inputs: every product and partial sum is exact in float32 (|sum| <= 4 x 100),
    # so the saved gate_up must equal the float64 product rounded once to the dtype, bit for bit.
    generator = torch.Generator().manual_seed(seed)
    tokens, hidden, inter, experts, top_k = 40, 100, 37, 3, 2
    topk_ids, topk_weights = make_routing(tokens, experts, top_k, mode="skip_last", generator=generator)
    routing = align(topk_ids, experts)
    x = torch.randint(-4, 5, (tokens, hidden), generator=generator).to(dtype)
    w_gate_up = torch.randint(-1, 2, (experts, 2 * inter, hidden), generator=generator).to(dtype)
    w_down = torch.randn(experts, hidden, inter, generator=generator).to(dtype)
    pairs = routing.sorted_pair_ids.long()
    expert_of_row = torch.repeat_interleave(torch.arange(experts), routing.expert_offsets.diff().long())
    expected = torch.einsum("sh,srh->sr", x[pairs // top_k].double(), w_gate_up[expert_of_row].double()).to(dtype)
    with poisoned_memory():
        y, gate_up = cpu_ops().experts_cpu_forward(x, w_gate_up, w_down, routing.sorted_pair_ids,
                                                   routing.expert_offsets, topk_weights, None, None, "silu",
                                                   "concatenated", True, 1.702, 7.0, threading, True)
    assert y.isfinite().all(), f"{(~y.isfinite()).any(1).sum().item()} of {y.shape[0]} output rows not finite"
    wrong = (gate_up != expected).nonzero()
    assert wrong.shape[0] == 0, (f"{wrong.shape[0]} of {gate_up.numel()} differ ({gate_up.isnan().sum().item()} NaN, "
                                 f"{gate_up.isnan().any(1).sum().item()} rows), first at {wrong[0].tolist()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threading", ("experts", "gemm"))
@pytest.mark.parametrize("gemm", [entry[0] for entry in GEMMS])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_output_and_every_gradient_on_poisoned_memory(case, gemm, threading, dtype, forced_gemm, seed):
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    # The references outside the poisoned mode (deterministic mode refuses some ops).
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out)
    typed = cast(inputs, dtype)
    if dtype != torch.float32:
        torch_out, torch_grads = run_with_grads(reference_experts, typed, options, grad_out)
    with poisoned_memory():
        out, grads = run_with_grads(lambda *a, **k: fused_experts_cpu(*a, threading=threading, **k), typed, options,
                                    grad_out)
    assert set(grads) == set(ref_grads)
    if dtype == torch.float32:
        assert_fp32_close(out, ref_out, "output")
        for name, grad in ref_grads.items():
            assert_fp32_close(grads[name], grad, f"d{name}")
        return
    assert_within_twice_same_dtype(out, torch_out, ref_out, "output")
    for name, grad in ref_grads.items():
        assert_within_twice_same_dtype(grads[name], torch_grads[name], grad, f"d{name}")
