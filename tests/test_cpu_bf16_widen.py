"""The two bf16 GEMMs of the native CPU expert ops (csrc/experts_cpu_widen.cpp), both run on
any machine by forcing TPMOE_CPU_BF16_GEMM: "native" (ATen's bf16 GEMM, or the AVX512-BF16
kernel where the CPU has it) and "widen" (float32 GEMMs on tiles widened from bf16, what
runs by default where the CPU has no bf16 dot product). Output and every gradient against
the float64 reference, within twice the error of a same-dtype PyTorch run; and the variable's
checks."""
import zlib

import pytest
import torch

from tpmoe._native import native_available
from tpmoe.cpu import bf16_gemm_path, cpu_ops, fused_experts_cpu
from tpmoe.reference import reference_experts
from tpmoe.routing import align

from experts_cases import cast, case_id, case_inputs, case_options, make_routing, run_with_grads
from tolerances import assert_within_twice_same_dtype

pytestmark = pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")

PATHS = ("native", "widen")

# (T, H, I_p, E, K, layout, gated, activation, bias, routing mode). One token (top-8, as in
# decode); prime T, H
# and I_p (an uneven TP shard of I); an expert without tokens; every token on one expert;
# each layout. H = 2100: the widened GEMM cuts the x @ W_gu^T weight into 48-column tiles
# (the last a partial one) and the 300 rows of the one-expert case into 124-row panels
# (tile and panel sizes in experts_cpu_widen.cpp), and in the backward dW_d's H = 2100 rows
# into panels too.
CASES = [
    (1, 40, 24, 8, 8, "concatenated", True, "silu", True, "random"),
    (37, 29, 13, 5, 2, "interleaved", True, "gelu_tanh", False, "skip_last"),
    (23, 31, 17, 4, 3, "gpt_oss", True, "clamped_swiglu", True, "one_expert"),
    (19, 24, 11, 3, 2, "concatenated", False, "relu2", True, "random"),
    (150, 2100, 37, 3, 2, "concatenated", True, "silu", True, "one_expert"),
    # H = 7: in "experts" each thread's dW slice has 3 or 4 rows of H, so the weight
    # gradients (transposed activations on the left) take the widened GEMM's few-row branch.
    (11, 7, 5, 3, 2, "gpt_oss", True, "silu", True, "random"),
    (11, 7, 5, 3, 2, "concatenated", True, "silu", True, "random"),
]


@pytest.fixture
def forced_path(request, monkeypatch):
    """TPMOE_CPU_BF16_GEMM set to the test's `path` parameter for the test's duration."""
    path = request.node.callspec.params["path"]
    monkeypatch.setenv("TPMOE_CPU_BF16_GEMM", path)
    assert bf16_gemm_path() == path
    return path


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threading", ("experts", "gemm"))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_output_and_every_gradient_on_both_gemms(case, threading, path, forced_path):
    # One seed per case, not per test id: both GEMMs and both threadings see the same inputs,
    # so what differs between them is the GEMM alone.
    inputs, grad_out = case_inputs(case, zlib.crc32(case_id(case).encode()))
    options = case_options(case)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out)
    bf16_inputs = cast(inputs, torch.bfloat16)
    torch_out, torch_grads = run_with_grads(reference_experts, bf16_inputs, options, grad_out)
    out, grads = run_with_grads(lambda *a, **k: fused_experts_cpu(*a, threading=threading, **k), bf16_inputs,
                                options, grad_out)
    assert out.dtype == torch.bfloat16
    assert_within_twice_same_dtype(out, torch_out, ref_out, "output")
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert grads[name].dtype == bf16_inputs[name].dtype
        assert_within_twice_same_dtype(grads[name], torch_grads[name], grad, f"d{name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threading", ("experts", "gemm"))
def test_gate_up_is_the_exact_sum_rounded_once(threading, path, forced_path, seed):
    # Small-integer inputs make every product and partial sum exact in float32 (|sum| <= 4 x
    # 2100 < 2^24), so the saved gate_up GEMM output must equal the float64 product rounded
    # once to bf16, bit for bit, across tile, panel and thread-slice edges; sums above 256 do
    # not fit bf16's 8 bits, so a second rounding (or a bf16 accumulator) would show.
    generator = torch.Generator().manual_seed(seed)
    tokens, hidden, inter, experts, top_k = 150, 2100, 37, 3, 2
    topk_ids, topk_weights = make_routing(tokens, experts, top_k, mode="one_expert", generator=generator)
    routing = align(topk_ids, experts)
    x = torch.randint(-4, 5, (tokens, hidden), generator=generator).bfloat16()
    w_gate_up = torch.randint(-1, 2, (experts, 2 * inter, hidden), generator=generator).bfloat16()
    w_down = torch.randn(experts, hidden, inter, generator=generator).bfloat16()
    _, gate_up = cpu_ops().experts_cpu_forward(x, w_gate_up, w_down, routing.sorted_pair_ids, routing.expert_offsets,
                                               topk_weights, None, None, "silu", "concatenated", True, 1.702, 7.0,
                                               threading, True)
    pairs = routing.sorted_pair_ids.long()
    expert_of_row = torch.repeat_interleave(torch.arange(experts), routing.expert_offsets.diff().long())
    expected = torch.einsum("sh,srh->sr", x[pairs // top_k].double(), w_gate_up[expert_of_row].double())
    assert expected.abs().max() > 256  # sums that bf16 must round
    expected = expected.bfloat16()
    wrong = (gate_up != expected).nonzero()
    assert wrong.shape[0] == 0, (f"{wrong.shape[0]} of {gate_up.numel()} differ ({gate_up.isnan().sum().item()} NaN), "
                                 f"first at {wrong[0].tolist()}: {gate_up[tuple(wrong[0])].item()} != "
                                 f"{expected[tuple(wrong[0])].item()}")


def test_auto_is_the_cpu_default_and_unset_is_auto(monkeypatch):
    monkeypatch.setenv("TPMOE_CPU_BF16_GEMM", "auto")
    auto = bf16_gemm_path()
    assert auto in PATHS
    monkeypatch.delenv("TPMOE_CPU_BF16_GEMM")
    assert bf16_gemm_path() == auto


def test_a_bad_value_names_the_variable_the_choices_and_the_value(monkeypatch, seed):
    monkeypatch.setenv("TPMOE_CPU_BF16_GEMM", "fp32")
    with pytest.raises(ValueError, match=r"TPMOE_CPU_BF16_GEMM: expected one of native, widen, auto.*got 'fp32'"):
        bf16_gemm_path()
    # The ops read it too: a bf16 call fails the same way, whatever entry point was used.
    inputs, _ = case_inputs(CASES[0], seed)
    bf16 = cast(inputs, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"TPMOE_CPU_BF16_GEMM: expected 'native', 'widen' or 'auto'.*got 'fp32'"):
        fused_experts_cpu(bf16["hidden_states"], bf16["w_gate_up"], bf16["w_down"], bf16["topk_ids"],
                          bf16["topk_weights"], b_gate_up=bf16["b_gate_up"], b_down=bf16["b_down"],
                          **case_options(CASES[0]))
