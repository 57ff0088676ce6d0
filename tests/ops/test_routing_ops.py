"""The native routing ops (csrc/) against their plain-PyTorch twins (tpmoe.routing_torch),
and the twins against a loop-style brute force in Python floats.

Ids and all `align` metadata must be bit-identical; weights within one rounding (the bounds
and the cases are in routing_cases.py, shared with the CUDA tests of test_gpu.py).
"""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tpmoe._native import native_available
from tpmoe.routing import AlignResult, align, route
from tpmoe.routing_torch import align_torch, route_torch, route_weights
from support.routing_cases import (LOGIT_DTYPES, SCORING_IDS, SCORINGS, SHAPES, align_cases, applicable,
                                   assert_align_equal, assert_weights_match, brute_force_align, masked_and_nan_logits,
                                   route_kwargs)
from support.tolerances import assert_fp32_close

pytestmark = pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built (pip install -e .)")


def assert_route_matches_twin(logits, top_k, **kwargs):
    weights, ids = route(logits, top_k, **kwargs)
    weights_twin, ids_twin = route_torch(logits, top_k, **kwargs)
    assert ids.dtype == torch.int64 and torch.equal(ids, ids_twin), f"ids differ:\n{ids}\n{ids_twin}"
    assert_weights_match(weights, weights_twin)
    return weights, ids


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=str)
@pytest.mark.parametrize("case", SCORINGS, ids=SCORING_IDS)
def test_route_matches_twin(case, dtype, seed):
    for num_tokens, num_experts, top_k in SHAPES:
        if not applicable(case, num_experts, top_k):
            continue
        logits = torch.randn(num_tokens, num_experts).to(dtype)
        weights, _ = assert_route_matches_twin(logits, top_k, **route_kwargs(case, num_experts))
        assert weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("case", SCORINGS, ids=SCORING_IDS)
def test_route_tied_scores(case, seed):
    """Logits on a coarse grid (many equal scores) and exactly equal rows: ties go to the lower
    expert index, on both sides."""
    num_experts, top_k = 16, 4
    grid_logits = torch.randint(-2, 3, (50, num_experts)).float() * 0.5
    equal_rows = torch.randn(1, num_experts).expand(6, num_experts).contiguous()
    constant_rows = torch.zeros(3, num_experts)
    logits = torch.cat([grid_logits, equal_rows, constant_rows])
    kwargs = route_kwargs(case, num_experts)
    if "correction_bias" in kwargs:
        kwargs["correction_bias"] = torch.randint(-1, 2, (num_experts,)).float() * 0.25
    _, ids = assert_route_matches_twin(logits, top_k, **kwargs)
    if case.get("n_group", 1) == 1 and "correction_bias" not in kwargs:
        # A constant row selects experts 0..K-1, in order.
        assert torch.equal(ids[-1], torch.arange(top_k))
    for dtype in (torch.bfloat16, torch.float16):
        assert_route_matches_twin(logits.to(dtype), top_k, **kwargs)


def test_route_masked_and_nan_logits(seed):
    """-inf logits (masked experts) and NaN logits: NaN ranks first, as torch.sort/topk do."""
    logits, rows = masked_and_nan_logits()
    for scoring in ("softmax", "topk_softmax"):
        weights, ids = route(logits, 3, scoring=scoring)
        weights_twin, ids_twin = route_torch(logits, 3, scoring=scoring)
        assert torch.equal(ids, ids_twin)
        assert ids[2, 0] == 7 and ids[1, 0] == 5 and 3 not in ids[0].tolist()
        assert_weights_match(weights[rows], weights_twin[rows])


def test_route_does_not_depend_on_threads(seed):
    logits = torch.randn(300, 60)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = route(logits, 6, scoring="softmax", renormalize=True)
        torch.set_num_threads(max(2, threads))
        several = route(logits, 6, scoring="softmax", renormalize=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], several[0]) and torch.equal(single[1], several[1])


# ---------------------------------------------------------------------------------------
# The twins against a brute force in Python floats
# ---------------------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def brute_force_route(logits, top_k, scoring="softmax", renormalize=False, correction_bias=None, n_group=1,
                      topk_group=1, routed_scaling_factor=1.0):
    all_weights, all_ids = [], []
    bias = [0.0] * logits.shape[1] if correction_bias is None else correction_bias.double().tolist()
    for row in logits.double().tolist():
        num_experts = len(row)
        if scoring == "sigmoid_group":
            score = [_sigmoid(x) + b for x, b in zip(row, bias)]
        else:
            score = list(row)
        candidates = list(range(num_experts))
        if scoring == "sigmoid_group" and n_group > 1:
            size = num_experts // n_group
            group_score = []
            for g in range(n_group):
                best_two = sorted(score[g * size:(g + 1) * size], reverse=True)[:2]
                group_score.append(sum(best_two))
            kept = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
            candidates = [e for e in candidates if e // size in kept]
        ids = sorted(candidates, key=lambda e: (-score[e], e))[:top_k]
        if scoring == "softmax":
            top = max(row)
            total = sum(math.exp(x - top) for x in row)
            weights = [math.exp(row[e] - top) / total for e in ids]
            if renormalize:
                weights = [w / sum(weights) for w in weights]
        elif scoring == "topk_softmax":
            total = sum(math.exp(row[e] - row[ids[0]]) for e in ids)
            weights = [math.exp(row[e] - row[ids[0]]) / total for e in ids]
        else:
            weights = [_sigmoid(row[e]) for e in ids]
            if renormalize:
                total = sum(weights) + 1e-20
                weights = [w / total for w in weights]
        all_weights.append([w * routed_scaling_factor for w in weights])
        all_ids.append(ids)
    return torch.tensor(all_weights, dtype=torch.float64), torch.tensor(all_ids, dtype=torch.int64)


@pytest.mark.parametrize("case", SCORINGS, ids=SCORING_IDS)
def test_route_twin_matches_brute_force(case, seed):
    num_experts, top_k = 8, 3
    logits = torch.cat([torch.randn(12, num_experts, dtype=torch.float64),
                        torch.randint(-2, 3, (6, num_experts)).double()])
    kwargs = route_kwargs(case, num_experts, dtype=torch.float64)
    weights, ids = route_torch(logits, top_k, **kwargs)
    weights_brute, ids_brute = brute_force_route(logits, top_k, **kwargs)
    assert torch.equal(ids, ids_brute)
    torch.testing.assert_close(weights, weights_brute, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", SCORINGS, ids=SCORING_IDS)
def test_route_matches_reference(case, dtype, seed):
    """Against tpmoe.reference (written independently of this module), on untied logits."""
    from tpmoe.reference import reference_route

    num_experts, top_k = 60, 6
    kwargs = route_kwargs(case, num_experts)
    logits = torch.randn(41, num_experts, dtype=dtype)
    weights, ids = route(logits, top_k, **kwargs)
    reference_weights, reference_ids = reference_route(logits.double(), top_k, **kwargs)
    assert torch.equal(ids, reference_ids)
    if dtype == torch.float64:
        torch.testing.assert_close(weights, reference_weights, rtol=1e-12, atol=1e-15)
    else:
        assert_fp32_close(weights, reference_weights, name="topk_weights")


@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_align_matches_twin(block_m, id_dtype):
    for name, topk_ids, num_experts in align_cases(id_dtype):
        result = align(topk_ids, num_experts, block_m)
        assert_align_equal(result, align_torch(topk_ids, num_experts, block_m))
        pairs = topk_ids.numel()
        assert result.sorted_ids_padded.numel() == pairs + min(num_experts, pairs) * (block_m - 1), name
        assert int(result.num_padded) % block_m == 0, name


@pytest.mark.parametrize("block_m", [1, 3, 4])
def test_align_twin_matches_brute_force(block_m):
    generator = torch.Generator().manual_seed(11)
    for topk_ids, num_experts in [(torch.randint(0, 5, (9, 2), generator=generator), 6),
                                  (torch.full((4, 1), 2), 3), (torch.empty(0, 3, dtype=torch.int64), 4)]:
        assert_align_equal(align_torch(topk_ids, num_experts, block_m),
                           brute_force_align(topk_ids, num_experts, block_m))


def test_align_does_not_depend_on_threads():
    topk_ids = torch.randint(0, 60, (9000, 8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = align(topk_ids, 60, 16)
        torch.set_num_threads(max(2, threads))
        several = align(topk_ids, 60, 16)
    finally:
        torch.set_num_threads(threads)
    assert_align_equal(single, several)


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SCORINGS, ids=SCORING_IDS)
def test_route_gradient_matches_twin_autograd(case, dtype, seed):
    num_tokens, num_experts, top_k = 9, 16, 4
    kwargs = route_kwargs(case, num_experts)
    logits = torch.randn(num_tokens, num_experts).to(dtype).requires_grad_()
    weights, ids = route(logits, top_k, **kwargs)
    grad_weights = torch.randn_like(weights)
    (grad,) = torch.autograd.grad(weights, logits, grad_weights)

    # torch.autograd through the twin's formula, in float64, with the same ids.
    logits64 = logits.detach().double().requires_grad_()
    weights64 = route_weights(logits64, ids, scoring=kwargs["scoring"], renormalize=kwargs.get("renormalize", False),
                              routed_scaling_factor=kwargs.get("routed_scaling_factor", 1.0))
    (grad64,) = torch.autograd.grad(weights64, logits64, grad_weights.double())
    assert grad.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(grad, grad64, rtol=1e-12, atol=1e-14)
    elif dtype == torch.float32:
        assert_fp32_close(grad, grad64, name="d router_logits")
    else:
        # One rounding of a float64 gradient to bfloat16 (8 significant bits): at most half an
        # ulp, 2**-8 relative; plus float64 noise (1e-12 of the largest) where the exact gradient
        # is zero (unselected experts under renormalisation) and the two formulas leave ~1e-18.
        bound = 2.0**-8 * grad64.abs() + 1e-12 * grad64.abs().max()
        assert ((grad.double() - grad64).abs() <= bound).all()


@pytest.mark.parametrize("case", SCORINGS, ids=SCORING_IDS)
def test_route_gradcheck(case, seed):
    num_experts = 8
    kwargs = route_kwargs(case, num_experts, dtype=torch.float64)
    logits = torch.randn(4, num_experts, dtype=torch.float64, requires_grad=True)
    # Finite differences of 1e-6 keep the selection unchanged: random logits are ~0.1 apart.
    assert torch.autograd.gradcheck(lambda x: route(x, 3, **kwargs)[0], (logits,))
    assert torch.autograd.gradgradcheck(lambda x: route(x, 3, **kwargs)[0], (logits,))


# ---------------------------------------------------------------------------------------
# Fake implementations: FakeTensorMode, opcheck, torch.compile
# ---------------------------------------------------------------------------------------


def test_fake_shapes_from_input_shapes():
    with FakeTensorMode():
        logits = torch.empty(9, 6, dtype=torch.bfloat16)
        weights, ids = torch.ops.tpmoe.route(logits, 2, "softmax", False, None, 1, 1, 1.0)
        assert (weights.shape, weights.dtype, ids.shape, ids.dtype) == ((9, 2), torch.float32, (9, 2), torch.int64)
        result = AlignResult(*torch.ops.tpmoe.align(ids, 6, 16))
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in zip(AlignResult._fields, result)}
    padded_rows = 18 + 6 * 15
    assert shapes == {
        "sorted_pair_ids": ((18,), torch.int32), "tokens_per_expert": ((6,), torch.int64),
        "expert_offsets": ((7,), torch.int64), "sorted_ids_padded": ((padded_rows,), torch.int32),
        "padded_offsets": ((7,), torch.int64), "block_expert": ((-(-padded_rows // 16),), torch.int32),
        "num_padded": ((1,), torch.int64),
    }


def test_opcheck(seed):
    logits = torch.randn(5, 8, requires_grad=True)
    bias = torch.randn(8)
    torch.library.opcheck(torch.ops.tpmoe.route.default, (logits, 3, "softmax", True, None, 1, 1, 1.0))
    torch.library.opcheck(torch.ops.tpmoe.route.default, (logits, 3, "sigmoid_group", True, bias, 4, 2, 2.5))
    torch.library.opcheck(torch.ops.tpmoe.align.default, (torch.randint(0, 8, (5, 3)), 8, 4))


def _route_and_align(logits, bias):
    weights, ids = route(logits, 3, scoring="sigmoid_group", renormalize=True, correction_bias=bias, n_group=4,
                         topk_group=2, routed_scaling_factor=2.5)
    result = align(ids, logits.shape[1], 4)
    return (weights * 2).sum(), ids, *result


def test_torch_compile_fullgraph(seed):
    compiled = torch.compile(_route_and_align, fullgraph=True, backend="aot_eager", dynamic=True)
    bias = 0.1 * torch.randn(16)
    for num_tokens in (5, 11):  # a second size reuses the dynamic-shape graph
        logits = torch.randn(num_tokens, 16, requires_grad=True)
        expected = _route_and_align(logits, bias)
        actual = compiled(logits, bias)
        for a, e in zip(actual, expected):
            assert torch.equal(a, e)
        (grad,) = torch.autograd.grad(actual[0], logits)
        (grad_eager,) = torch.autograd.grad(expected[0], logits)
        assert torch.equal(grad, grad_eager)
