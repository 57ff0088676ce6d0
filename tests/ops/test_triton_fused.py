"""The Triton fused experts, forward and backward, against tpmoe.reference: output and every gradient.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py sets it when there is no GPU).
fp16/bf16 within twice the error of a same-dtype PyTorch run of the reference
(tests/support/tolerances.py); fp32 and float64 on every case: tests/ops/test_experts_contract.py.
"""
import os

import pytest
import torch

from support.experts_cases import case_id, case_inputs, case_options, make_inputs, run_with_grads
from support.tolerances import assert_fp32_close, assert_within_twice_same_dtype, max_rel_error
from support.triton_problems import DEVICE

pytestmark = [
    pytest.mark.triton,  # skipped where the kernels cannot run (conftest.py)
    # The interpreter's tl.sigmoid evaluates exp(-x) in numpy, which warns when it reaches inf for
    # x << 0 (the gated-only activations' large inputs); the result, 1 / (1 + inf) = 0, is the right one.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

import tpmoe  # noqa: E402
from tpmoe.reference import reference_experts  # noqa: E402
from tpmoe.triton import fused_experts_triton  # noqa: E402

# Each layout, a gated-only activation of each kind, not gated.
HALF_CASES = [
    (37, 48, 40, 7, 2, "concatenated", True, "silu", False, "skip_last"),
    (11, 24, 10, 4, 2, "gpt_oss", True, "clamped_swiglu", True, "random"),
    (17, 16, 8, 5, 5, "concatenated", False, "relu", True, "random"),
    (21, 33, 40, 4, 2, "interleaved", True, "silu", True, "one_expert"),
    (13, 20, 9, 3, 2, "interleaved", True, "silu_clamped", False, "one_expert"),
    (9, 24, 12, 4, 2, "gpt_oss", True, "softcapped_swiglu", True, "skip_last"),
]
ONE_TOKEN_CASE = (1, 24, 12, 5, 3, "concatenated", True, "gelu", True, "random")
ONE_EXPERT_CASE = (13, 40, 9, 6, 2, "interleaved", True, "gelu_tanh", True, "one_expert")


def triton_path(*args, **kwargs):
    return fused_experts_triton(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", HALF_CASES, ids=case_id)
def test_triton_half_within_twice_same_dtype_torch(case, dtype, seed):
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out, torch.float64)
    torch_out, torch_grads = run_with_grads(reference_experts, inputs, options, grad_out, dtype)
    out, grads = run_with_grads(triton_path, inputs, options, grad_out, dtype, DEVICE)
    assert out.dtype == dtype
    # Used only if the same-dtype run is exact: the dtype's unit roundoff.
    floor = torch.finfo(dtype).eps / 2
    assert_within_twice_same_dtype(out, torch_out, ref_out, "output", floor=floor)
    for name, grad in ref_grads.items():
        assert grads[name].dtype == (torch.float32 if name == "topk_weights" else dtype), name
        assert_within_twice_same_dtype(grads[name], torch_grads[name], grad, f"d{name}", floor=floor)


def test_half_tolerance_is_not_vacuous(seed):
    """The bf16 bound catches a real mistake: dropping one (token, k) contribution fails it."""
    case = HALF_CASES[0]
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    ref_out, _ = run_with_grads(reference_experts, inputs, options, grad_out, torch.float64)
    torch_out, _ = run_with_grads(reference_experts, inputs, options, grad_out, torch.bfloat16)
    broken = dict(inputs)
    broken["topk_weights"] = inputs["topk_weights"].clone()
    broken["topk_weights"][5, 1] = 0.0
    out, _ = run_with_grads(triton_path, broken, options, grad_out, torch.bfloat16, DEVICE)
    with pytest.raises(AssertionError):
        assert_within_twice_same_dtype(out, torch_out, ref_out, "output")


def test_deterministic_bitwise(seed):
    case = HALF_CASES[3]
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    first = run_with_grads(triton_path, inputs, options, grad_out, torch.bfloat16, DEVICE)
    second = run_with_grads(triton_path, inputs, options, grad_out, torch.bfloat16, DEVICE)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def test_strided_weight_shards_are_read_in_place(seed):
    """A TP shard that is a view (every other gate/up column pair of a larger weight): no copy needed."""
    case = (14, 24, 10, 4, 2, "gpt_oss", True, "silu", True, "random")
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out, torch.float64)
    full = torch.zeros(4, 24, 40, dtype=torch.float64)
    full[:, :, 0::2] = inputs["w_gate_up"]
    strided = full.to(DEVICE, torch.float32)[:, :, 0::2]
    assert not strided.is_contiguous()
    out = fused_experts_triton(inputs["hidden_states"].to(DEVICE, torch.float32), strided,
                               inputs["w_down"].to(DEVICE, torch.float32), inputs["topk_ids"].to(DEVICE),
                               inputs["topk_weights"].to(DEVICE, torch.float32),
                               b_gate_up=inputs["b_gate_up"].to(DEVICE, torch.float32),
                               b_down=inputs["b_down"].to(DEVICE, torch.float32), **options)
    assert_fp32_close(out.cpu(), ref_out, "output from a strided w_gate_up")


def test_only_input_gradient_requested(seed):
    """Frozen weights: the weight-gradient kernels are skipped and dx is still right."""
    case = ONE_TOKEN_CASE
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    _, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out, torch.float64)
    x = inputs["hidden_states"].to(DEVICE, torch.float32).requires_grad_(True)
    as32 = {name: value.to(DEVICE, torch.float32) for name, value in inputs.items() if name != "topk_ids"}
    out = fused_experts_triton(x, as32["w_gate_up"], as32["w_down"], inputs["topk_ids"].to(DEVICE),
                               as32["topk_weights"], b_gate_up=as32["b_gate_up"], b_down=as32["b_down"], **options)
    out.backward(grad_out.to(DEVICE, torch.float32))
    assert_fp32_close(x.grad.cpu(), ref_grads["hidden_states"], "dhidden_states")


@pytest.mark.parametrize("num_tokens,inter", [(0, 8), (5, 0)])
def test_empty_sizes(num_tokens, inter, seed):
    """T = 0, and I_p = 0 (a rank with no columns): y is the weighted down bias."""
    inputs, grad_out = make_inputs(seed, num_tokens, 16, inter, 3, 2, layout="concatenated", gated=True,
                                   bias=True)
    options = dict(activation="silu", layout="concatenated", gated=True, alpha=1.702, limit=7.0)
    ref = reference_experts(**{"hidden_states": inputs["hidden_states"]}, w_gate_up=inputs["w_gate_up"],
                            w_down=inputs["w_down"], topk_ids=inputs["topk_ids"],
                            topk_weights=inputs["topk_weights"], b_gate_up=inputs["b_gate_up"],
                            b_down=inputs["b_down"], **options)
    out = fused_experts_triton(inputs["hidden_states"], inputs["w_gate_up"], inputs["w_down"], inputs["topk_ids"],
                               inputs["topk_weights"], b_gate_up=inputs["b_gate_up"], b_down=inputs["b_down"],
                               **options)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if out.numel():
        assert_fp32_close(out, ref, "output", rtol=1e-12)


def test_public_entry_point_dispatches_here(seed):
    case = ONE_EXPERT_CASE
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out, torch.float64)
    out, grads = run_with_grads(lambda *a, **k: tpmoe.fused_experts(*a, backend="triton", **k), inputs, options,
                                grad_out, torch.float32, DEVICE)
    assert_fp32_close(out, ref_out, "output")
    for name, grad in ref_grads.items():
        assert_fp32_close(grads[name], grad, f"d{name}")
    assert max_rel_error(out, ref_out) > 0  # really ran in fp32, not a copy of the reference


def test_traces_whole_under_torch_compile(seed):
    """Every launch is a custom op with a fake: torch.compile captures forward and backward in one graph."""
    case = (9, 16, 16, 4, 2, "concatenated", True, "silu", True, "random")
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    eager_out, eager_grads = run_with_grads(triton_path, inputs, options, grad_out, torch.float32, DEVICE)
    compiled = torch.compile(triton_path, backend="aot_eager", fullgraph=True)
    out, grads = run_with_grads(compiled, inputs, options, grad_out, torch.float32, DEVICE)
    assert torch.equal(out, eager_out)
    for name, grad in eager_grads.items():
        assert torch.equal(grads[name], grad), name
