"""Bad input to `tpmoe.route` / `tpmoe.align` raises a Python exception that names the
argument, what was expected and what came (before either the native op or its plain-PyTorch
twin runs); the raw native ops raise RuntimeError (their TORCH_CHECKs), never crash."""
import pytest
import torch

from tpmoe._native import native_available
from tpmoe.routing import align, route

needs_native = pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built (pip install -e .)")


def _logits(num_tokens=4, num_experts=8):
    return torch.randn(num_tokens, num_experts)


# (test id, route args, route kwargs, exception, pattern naming argument + expected + got)
ROUTE_ERRORS = [
    ("logits_not_tensor", ([[1.0, 2.0]], 1), {}, TypeError, r"router_logits: expected a torch.Tensor, got list"),
    ("logits_int", (torch.ones(2, 4, dtype=torch.int64), 1), {}, TypeError,
     r"router_logits: expected dtype float32.*got torch.int64"),
    ("logits_1d", (torch.randn(8), 1), {}, ValueError, r"router_logits: expected a 2-D tensor \[T, E\], got shape \(8,\)"),
    ("logits_3d", (torch.randn(2, 3, 8), 1), {}, ValueError, r"router_logits: expected a 2-D.*got shape \(2, 3, 8\)"),
    ("logits_no_experts", (torch.randn(3, 0), 1), {}, ValueError, r"router_logits: expected at least one expert"),
    ("k_above_e", (_logits(), 9), {}, ValueError, r"top_k: expected <= the number of experts \(8\), got 9"),
    ("k_zero", (_logits(), 0), {}, ValueError, r"top_k: expected an int >= 1, got 0"),
    ("k_float", (_logits(), 2.0), {}, TypeError, r"top_k: expected an int, got float 2.0"),
    ("unknown_scoring", (_logits(), 2), dict(scoring="sparsemax"), ValueError,
     r"scoring: expected one of \('softmax', 'topk_softmax', 'sigmoid_group'\), got 'sparsemax'"),
    ("renormalize_not_bool", (_logits(), 2), dict(renormalize="yes"), TypeError,
     r"renormalize: expected a bool, got str 'yes'"),
    ("n_group_not_divisor", (_logits(), 2), dict(scoring="sigmoid_group", n_group=3), ValueError,
     r"n_group: expected a divisor of the number of experts \(8\), got 3"),
    ("n_group_zero", (_logits(), 2), dict(scoring="sigmoid_group", n_group=0), ValueError,
     r"n_group: expected an int >= 1, got 0"),
    ("topk_group_above_n_group", (_logits(), 2), dict(scoring="sigmoid_group", n_group=2, topk_group=3), ValueError,
     r"topk_group: expected <= n_group \(2\), got 3"),
    ("k_above_kept_experts", (_logits(), 3), dict(scoring="sigmoid_group", n_group=4, topk_group=1), ValueError,
     r"top_k: expected <= the experts of the kept groups .* = 2\), got 3"),
    ("groups_without_sigmoid_group", (_logits(), 2), dict(n_group=2), ValueError,
     r"n_group/topk_group: group-limited routing needs scoring='sigmoid_group', got n_group=2"),
    ("bias_without_sigmoid_group", (_logits(), 2), dict(correction_bias=torch.zeros(8)), ValueError,
     r"correction_bias: only scoring='sigmoid_group' uses it, got a tensor with scoring='softmax'"),
    ("bias_wrong_shape", (_logits(), 2), dict(scoring="sigmoid_group", correction_bias=torch.zeros(7)), ValueError,
     r"correction_bias: expected shape \(8,\), got \(7,\)"),
    ("bias_2d", (_logits(), 2), dict(scoring="sigmoid_group", correction_bias=torch.zeros(1, 8)), ValueError,
     r"correction_bias: expected shape \(8,\), got \(1, 8\)"),
    ("bias_int", (_logits(), 2), dict(scoring="sigmoid_group", correction_bias=torch.zeros(8, dtype=torch.int32)),
     TypeError, r"correction_bias: expected a floating dtype, got torch.int32"),
    ("bias_other_device", (_logits(), 2), dict(scoring="sigmoid_group", correction_bias=torch.zeros(8, device="meta")),
     ValueError, r"correction_bias: expected device cpu \(that of router_logits\), got meta"),
    ("scaling_nan", (_logits(), 2), dict(routed_scaling_factor=float("nan")), ValueError,
     r"routed_scaling_factor: expected a finite number, got nan"),
    ("scaling_not_number", (_logits(), 2), dict(routed_scaling_factor="2"), TypeError,
     r"routed_scaling_factor: expected a float, got str"),
]


@pytest.mark.parametrize("args, kwargs, error, pattern", [c[1:] for c in ROUTE_ERRORS], ids=[c[0] for c in ROUTE_ERRORS])
def test_route_bad_input(args, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        route(*args, **kwargs)


ALIGN_ERRORS = [
    ("ids_not_tensor", ([[0, 1]], 4), TypeError, r"topk_ids: expected a torch.Tensor, got list"),
    ("ids_float", (torch.zeros(3, 2), 4), TypeError, r"topk_ids: expected dtype int32 or int64, got torch.float32"),
    ("ids_int16", (torch.zeros(3, 2, dtype=torch.int16), 4), TypeError, r"topk_ids: expected dtype int32 or int64"),
    ("ids_1d", (torch.zeros(6, dtype=torch.int64), 4), ValueError,
     r"topk_ids: expected a 2-D tensor \[T, K\], got shape \(6,\)"),
    ("ids_at_e", (torch.tensor([[0, 4], [1, 2]]), 4), ValueError,
     r"topk_ids: expected expert ids in \[0, 4\), got values in \[0, 4\]"),
    ("ids_negative", (torch.tensor([[0, -1]], dtype=torch.int32), 4), ValueError,
     r"topk_ids: expected expert ids in \[0, 4\), got values in \[-1, 0\]"),
    ("num_experts_zero", (torch.zeros(2, 1, dtype=torch.int64), 0), ValueError,
     r"num_experts: expected an int >= 1, got 0"),
    ("num_experts_float", (torch.zeros(2, 1, dtype=torch.int64), 4.0), TypeError,
     r"num_experts: expected an int, got float"),
    ("block_m_zero", (torch.zeros(2, 1, dtype=torch.int64), 4, 0), ValueError, r"block_m: expected an int >= 1, got 0"),
    # A meta tensor has the shape without the memory: T*K = 2**31 pairs do not fit int32 ids.
    ("too_many_pairs", (torch.empty(2**30, 2, dtype=torch.int64, device="meta"), 4), ValueError,
     r"topk_ids: expected T\*K < 2\*\*31 - 1 \(pair ids are int32\), got T\*K = 2147483648"),
]


@pytest.mark.parametrize("args, error, pattern", [c[1:] for c in ALIGN_ERRORS], ids=[c[0] for c in ALIGN_ERRORS])
def test_align_bad_input(args, error, pattern):
    with pytest.raises(error, match=pattern):
        align(*args)


RAW_OP_ERRORS = [
    ("route_1d", "route", (torch.randn(8), 2, "softmax", False, None, 1, 1, 1.0), r"router_logits: expected a 2-D"),
    ("route_int", "route", (torch.ones(2, 8, dtype=torch.int32), 2, "softmax", False, None, 1, 1, 1.0),
     r"router_logits: expected float32"),
    ("route_k_above_e", "route", (torch.randn(2, 8), 9, "softmax", False, None, 1, 1, 1.0),
     r"top_k: expected 1 <= top_k <= 8, got 9"),
    ("route_scoring", "route", (torch.randn(2, 8), 2, "nope", False, None, 1, 1, 1.0), r"scoring: expected"),
    ("route_n_group", "route", (torch.randn(2, 8), 2, "sigmoid_group", False, None, 3, 1, 1.0),
     r"n_group: expected a divisor of 8, got 3"),
    ("route_bias_shape", "route", (torch.randn(2, 8), 2, "sigmoid_group", False, torch.zeros(5), 1, 1, 1.0),
     r"correction_bias: expected shape \[8\]"),
    ("align_out_of_range", "align", (torch.tensor([[0, 9]]), 4, 1), r"topk_ids: expected expert ids in \[0, 4\), got 9"),
    ("align_negative", "align", (torch.tensor([[-3, 1]], dtype=torch.int32), 4, 1), r"got -3 at flat position 0"),
    ("align_float", "align", (torch.zeros(2, 2), 4, 1), r"topk_ids: expected int32 or int64"),
    ("align_block_m", "align", (torch.zeros(2, 2, dtype=torch.int64), 4, 0), r"block_m: expected >= 1, got 0"),
]


@needs_native
@pytest.mark.parametrize("op, args, pattern", [c[1:] for c in RAW_OP_ERRORS], ids=[c[0] for c in RAW_OP_ERRORS])
def test_raw_native_op_raises(op, args, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        getattr(torch.ops.tpmoe, op)(*args)
