"""The two bf16 GEMMs of the native CPU expert ops (csrc/experts_cpu_widen.cpp), both run on
any machine by forcing TPMOE_CPU_BF16_GEMM: "native" (ATen's bf16 GEMM, or the AVX512-BF16
kernel where the CPU has it) and "widen" (float32 GEMMs on tiles widened from bf16, what
runs by default where the CPU has no bf16 dot product). The widened GEMM runs each of its
float32 kernels this CPU has, forced by TPMOE_CPU_WIDEN_KERNEL: "avx512", "avx2" (the
hand-written ones, csrc/experts_cpu_widen_kernels.h) and "aten" (ATen's float32 GEMM on the
tiles, the portable path). Output and every gradient against the float64 reference, within
twice the error of a same-dtype PyTorch run; and the variables' checks."""
import zlib

import pytest
import torch

from tpmoe._native import native_available
from tpmoe.cpu import bf16_gemm_path, cpu_ops, fused_experts_cpu
from tpmoe.reference import reference_experts
from tpmoe.routing import align

from support.experts_cases import cast, case_id, case_inputs, case_options, make_routing, run_with_grads
from support.tolerances import assert_within_twice_same_dtype

pytestmark = pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")

PATHS = ("native", "widen")
WIDEN_KERNELS = ("avx512", "avx2", "aten")
# (path, widen kernel): the native GEMM once, the widened one with each of its kernels.
GEMMS = [("native", "auto")] + [("widen", kernel) for kernel in WIDEN_KERNELS]

# (T, H, I_p, E, K, layout, gated, activation, bias, routing mode). One token (top-8, as in
# decode); prime T, H
# and I_p (an uneven TP shard of I); an expert without tokens; every token on one expert;
# each layout. H = 2100: the widened GEMM cuts the x @ W_gu^T weight into partial-ended
# tiles (60 columns with its kernels, 48 with ATen's) and the 300 rows of the one-expert case
# into 124-row panels (tile and panel sizes in experts_cpu_widen.cpp), its backward's
# K = 2100 GEMMs into 256-deep k chunks (the last 52 deep), and dW_d's H = 2100 rows into
# panels too.
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
    # k a multiple of 32 with many rows an expert: the widened GEMM's packed kernel (bf16
    # weights widened in its loads); 17-column slices end on an overlapping group of 4.
    (64, 64, 34, 4, 2, "concatenated", True, "silu", False, "random"),
    (64, 96, 32, 3, 2, "interleaved", True, "gelu_tanh", True, "random"),
    # A handful of rows an expert (5 to 13) through the packed kernel: row groups split evenly
    # (7 rows as 4 + 3 with the 6-row tiles), k a multiple of 32 in both GEMMs.
    (13, 64, 32, 3, 2, "concatenated", True, "silu", False, "random"),
]


def _tiny_widened_call():
    inputs, _ = case_inputs(CASES[0], 0)
    bf16 = cast(inputs, torch.bfloat16)
    return fused_experts_cpu(bf16["hidden_states"], bf16["w_gate_up"], bf16["w_down"], bf16["topk_ids"],
                             bf16["topk_weights"], b_gate_up=bf16["b_gate_up"], b_down=bf16["b_down"],
                             **case_options(CASES[0]))


@pytest.fixture
def forced_path(request, monkeypatch):
    """TPMOE_CPU_BF16_GEMM set to the test's `path` parameter (and TPMOE_CPU_WIDEN_KERNEL to
    its `kernel`, where it has one) for the test's duration; a kernel this CPU lacks skips."""
    params = request.node.callspec.params
    path, kernel = params["gemm"] if "gemm" in params else (params["path"], "auto")
    monkeypatch.setenv("TPMOE_CPU_BF16_GEMM", path)
    monkeypatch.setenv("TPMOE_CPU_WIDEN_KERNEL", kernel)
    assert bf16_gemm_path() == path
    if path == "widen" and kernel in ("avx512", "avx2"):
        try:
            _tiny_widened_call()
        except RuntimeError as error:
            if "does not support it" in str(error) or "has no x86 kernels" in str(error):
                pytest.skip(f"TPMOE_CPU_WIDEN_KERNEL={kernel}: {error}")
            raise
    return path


def gemm_id(gemm):
    return gemm[0] if gemm[0] == "native" else f"widen-{gemm[1]}"


@pytest.mark.parametrize("gemm", GEMMS, ids=gemm_id)
@pytest.mark.parametrize("threading", ("experts", "gemm"))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_output_and_every_gradient_on_both_gemms(case, threading, gemm, forced_path):
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


@pytest.mark.parametrize("gemm", GEMMS, ids=gemm_id)
@pytest.mark.parametrize("threading", ("experts", "gemm"))
@pytest.mark.parametrize("layout", ("concatenated", "gpt_oss"))
@pytest.mark.parametrize("hidden", (2100, 2048))
def test_gate_up_is_the_exact_sum_rounded_once(hidden, layout, threading, gemm, forced_path, seed):
    # Small-integer inputs make every product and partial sum exact in float32 (|sum| <= 4 x
    # 2100 < 2^24), so the saved gate_up GEMM output must equal the float64 product rounded
    # once to bf16, bit for bit, across tile, panel and thread-slice edges; sums above 256 do
    # not fit bf16's 8 bits, so a second rounding (or a bf16 accumulator) would show. The two
    # layouts take the widened GEMM's two kernels (x @ W^T: dot products along k, padded k
    # 2100 -> 2112; x @ W: outer products over 256-deep k chunks, 2100 = 8 x 256 + 52);
    # H = 2048, a multiple of 32, takes the packed dot kernel (the bf16 weight widened in its
    # loads, k summed in a permuted order).
    generator = torch.Generator().manual_seed(seed)
    tokens, inter, experts, top_k = 150, 37, 3, 2
    topk_ids, topk_weights = make_routing(tokens, experts, top_k, mode="one_expert", generator=generator)
    routing = align(topk_ids, experts)
    x = torch.randint(-4, 5, (tokens, hidden), generator=generator).bfloat16()
    w_gate_up = torch.randint(-1, 2, (experts, 2 * inter, hidden), generator=generator).bfloat16()
    w_down = torch.randn(experts, hidden, inter, generator=generator).bfloat16()
    if layout == "gpt_oss":  # [E, H, R] and [E, I, H], the same values
        w_gate_up, w_down = w_gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
    _, gate_up = cpu_ops().experts_cpu_forward(x, w_gate_up, w_down, routing.sorted_pair_ids, routing.expert_offsets,
                                               topk_weights, None, None, "silu", layout, True, 1.702, 7.0,
                                               threading, True)
    pairs = routing.sorted_pair_ids.long()
    expert_of_row = torch.repeat_interleave(torch.arange(experts), routing.expert_offsets.diff().long())
    weights = w_gate_up if layout == "concatenated" else w_gate_up.transpose(1, 2)
    expected = torch.einsum("sh,srh->sr", x[pairs // top_k].double(), weights[expert_of_row].double())
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


def test_a_bad_widen_kernel_names_the_variable_the_choices_and_the_value(monkeypatch):
    monkeypatch.setenv("TPMOE_CPU_BF16_GEMM", "widen")
    monkeypatch.setenv("TPMOE_CPU_WIDEN_KERNEL", "sse")
    with pytest.raises(RuntimeError,
                       match=r"TPMOE_CPU_WIDEN_KERNEL: expected 'avx512', 'avx2', 'aten' or 'auto'.*got 'sse'"):
        _tiny_widened_call()


@pytest.mark.parametrize("gemm", GEMMS[1:], ids=gemm_id)
@pytest.mark.parametrize("layout", ("concatenated", "gpt_oss"))
def test_widened_store_rounds_like_torch(layout, gemm, forced_path):
    # Each output of gate_up is exactly one float32 value the test chose, rounded once to
    # bf16 by the kernels' vector store; it must equal torch's own float32 -> bf16 rounding
    # bit for bit: ties to even (up and down), the tie at the largest finite value (to inf),
    # and a NaN row. Each value has its low 8 bits zero, so it is the exact sum of two bf16
    # numbers (its upper 16 bits and the rest), which two columns of x pick out.
    hidden, inter = 48, 40  # 2 I = 80 output columns: whole vectors and a tail on either ISA
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F804000, -0x407E8000, 0x7F7F8000, 0x7F7F7F00,
                         0x477FE000, 0x00000000, 0x42F6A000, -0x3D095000], dtype=torch.int32)
    values = bits.view(torch.float32)
    weight = values.repeat(2 * inter * hidden // values.numel() + 1)[:2 * inter * hidden].view(2 * inter, hidden)
    high = (weight.view(torch.int32) & -0x10000).view(torch.float32)
    low = weight - high
    assert torch.equal(high.bfloat16().float(), high) and torch.equal(low.bfloat16().float(), low)
    w_gate_up = torch.cat([high, low], dim=1).bfloat16().unsqueeze(0)  # [1, R, 2H]
    x = torch.zeros(hidden, 2 * hidden)
    x[torch.arange(hidden), torch.arange(hidden)] = 1.0
    x[torch.arange(hidden), hidden + torch.arange(hidden)] = 1.0
    x[5, 7] = float("nan")  # token 5's whole row
    x = x.bfloat16()
    w_down = torch.zeros(1, 2 * hidden, inter).bfloat16()
    if layout == "gpt_oss":
        w_gate_up, w_down = w_gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
    routing = align(torch.zeros(hidden, 1, dtype=torch.int64), 1)
    _, gate_up = cpu_ops().experts_cpu_forward(x, w_gate_up, w_down, routing.sorted_pair_ids, routing.expert_offsets,
                                               torch.ones(hidden, 1), None, None, "silu", layout, True, 1.702, 7.0,
                                               "experts", True)
    order = routing.sorted_pair_ids.long()  # sorted row s holds token order[s]
    expected = weight.t()[order].clone()
    expected[order == 5] = float("nan")
    expected = expected.bfloat16()
    assert torch.isinf(expected).any() and torch.isnan(expected).any()
    assert torch.equal(gate_up.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(gate_up[finite].view(torch.int16), expected[finite].view(torch.int16))
