"""The native CPU expert ops (csrc/experts_cpu_*.cpp via tpmoe.cpu) against the loop-style
reference: output and every gradient, every layout and activation, both threading regimes."""
import pytest
import torch

from tpmoe._native import native_available
from tpmoe.config import ACTIVATIONS, GATED_ONLY_ACTIVATIONS
from tpmoe.cpu import cpu_ops, fused_experts_cpu
from tpmoe.reference import reference_experts
from tpmoe.routing import align

from support import experts_cases
from support.experts_cases import (cast, case_id, case_inputs, case_options, input_scale, make_inputs, make_routing,
                                   options_for, run_with_grads)
from support.tolerances import assert_fp32_close, assert_within_twice_same_dtype

pytestmark = pytest.mark.skipif(not native_available(), reason="tpmoe._C is not built")

THREADINGS = ("experts", "gemm")


def native(threading):
    return lambda *args, **kwargs: fused_experts_cpu(*args, threading=threading, **kwargs)


# The shared cases, and what the native kernels' two threading regimes add to them.
CASES = experts_cases.CASES + [
    # (T, H, I_p, E, K, layout, gated, activation, bias, routing mode)
    (17, 40, 8, 5, 5, "concatenated", False, "relu", True, "random"),  # K = E
    (29, 33, 40, 7, 3, "gpt_oss", True, "silu", True, "one_expert"),
    (64, 48, 21, 3, 2, "interleaved", False, "silu", True, "random"),  # many rows per expert
    (12, 20, 11, 4, 2, "interleaved", True, "clamped_swiglu", False, "random"),
    (13, 20, 9, 4, 3, "interleaved", True, "silu_clamped", False, "random"),
    (11, 16, 12, 4, 2, "gpt_oss", True, "softcapped_swiglu", True, "one_expert"),
    (10, 16, 8, 4, 2, "gpt_oss", True, "relu2", True, "random"),
    # Non-gated relu2 without bias on 64 rows x 48 columns: the ATen activation in "gemm", the
    # scalar loop on each thread's 24 columns in "experts".
    (64, 24, 48, 2, 2, "concatenated", False, "relu2", False, "random"),
]


@pytest.mark.parametrize("threading", THREADINGS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference_fp64_and_fp32(case, threading, seed):
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out)
    out64, grads64 = run_with_grads(native(threading), inputs, options, grad_out)
    assert_fp32_close(out64, ref_out, "output fp64", rtol=1e-12)
    assert set(grads64) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert_fp32_close(grads64[name], grad, f"d{name} fp64", rtol=1e-12)
    int32_ids = dict(inputs, topk_ids=inputs["topk_ids"].int())
    out32, grads32 = run_with_grads(native(threading), int32_ids, options, grad_out, torch.float32)
    assert out32.dtype == torch.float32
    assert_fp32_close(out32, ref_out, "output fp32")
    for name, grad in ref_grads.items():
        assert grads32[name].dtype == torch.float32
        assert_fp32_close(grads32[name], grad, f"d{name} fp32")


@pytest.mark.parametrize("threading", THREADINGS)
def test_empty_intermediate_shard(threading, seed):
    # A TP rank with I_p = 0: the output is the weighted down bias, dx is zero.
    inputs, grad_out = make_inputs(seed, 6, 8, 0, 3, 2, layout="concatenated", gated=True, bias=True)
    options = options_for("silu", "concatenated", True)
    out, grads = run_with_grads(native(threading), inputs, options, grad_out)
    expected = (inputs["topk_weights"][..., None] * inputs["b_down"][inputs["topk_ids"]]).sum(dim=1)
    assert_fp32_close(out, expected, "output", rtol=1e-12)
    assert torch.count_nonzero(grads["hidden_states"]) == 0
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out)
    for name in ("topk_weights", "b_down"):
        assert_fp32_close(grads[name], ref_grads[name], f"d{name}", rtol=1e-12)
    assert grads["w_gate_up"].shape == (3, 0, 8) and grads["w_down"].shape == (3, 8, 0)


@pytest.mark.parametrize("threading", THREADINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,activation,gated", [("concatenated", "silu", True),
                                                     ("gpt_oss", "clamped_swiglu", True),
                                                     ("interleaved", "gelu", False),
                                                     ("concatenated", "clamped_silu", True),
                                                     ("gpt_oss", "silu_clamped", True),
                                                     ("interleaved", "softcapped_swiglu", True),
                                                     ("concatenated", "relu2", False)])
def test_half_precision_within_twice_torch_error(layout, activation, gated, dtype, threading, seed):
    inputs, grad_out = make_inputs(seed, 41, 64, 48, 6, 2, layout=layout, gated=gated, bias=True,
                                   scale=input_scale(activation, 8.0))
    options = options_for(activation, layout, gated)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out)
    half_inputs = cast(inputs, dtype)
    torch_out, torch_grads = run_with_grads(reference_experts, half_inputs, options, grad_out)
    out, grads = run_with_grads(native(threading), half_inputs, options, grad_out)
    assert out.dtype == dtype
    assert_within_twice_same_dtype(out, torch_out, ref_out, "output")
    for name, grad in ref_grads.items():
        assert grads[name].dtype == half_inputs[name].dtype
        assert_within_twice_same_dtype(grads[name], torch_grads[name], grad, f"d{name}")


@pytest.mark.parametrize("layout,activation", [("concatenated", "silu"), ("interleaved", "gelu_tanh")])
@pytest.mark.parametrize("num_tokens,num_experts,mode,hidden,inter", [
    (1, 4, "random", 80, 37), (6, 3, "one_expert", 80, 37), (53, 3, "one_expert", 80, 37),
    (9, 7, "skip_last", 80, 37), (6, 3, "one_expert", 2100, 75), (53, 3, "one_expert", 2100, 75)])
def test_bf16_kernel_within_twice_torch_error(layout, activation, num_tokens, num_experts, mode, hidden, inter,
                                              seed, monkeypatch):
    # The bf16 GEMM (csrc/experts_cpu_gemm.cpp, on CPUs with AVX512-BF16) runs every expert in
    # the "experts" regime (whatever its rows here: with AMX it would leave those past 4 rows
    # to ATen by default): input rows in groups of up to 4 (1 token: groups of 1 row; 6
    # tokens on expert 0: a group of 4 and one of 2; 53 tokens: 14 groups, the last of one
    # row), each against blocks of weight rows while the next block (or the next GEMM's
    # first) is prefetched. H = 80 leaves a 16-lane tail of the 32-lane dot products and
    # I = 37 tails of the 6- and 4-column tiles; H = 2100 makes 30-row weight blocks, so
    # gate_up runs two blocks per thread slice, the second a partial one, and the down GEMM's
    # K = 75 ends in an 11-lane tail.
    monkeypatch.setenv("TPMOE_CPU_BF16_KERNEL_MAX_ROWS", str(2**62))
    inputs, grad_out = make_inputs(seed, num_tokens, hidden, inter, num_experts, 2, layout=layout, gated=True,
                                   bias=True, mode=mode)
    options = options_for(activation, layout, True)
    ref_out, _ = run_with_grads(reference_experts, inputs, options, grad_out)
    half_inputs = cast(inputs, torch.bfloat16)
    torch_out, _ = run_with_grads(reference_experts, half_inputs, options, grad_out)
    with torch.no_grad():
        out = fused_experts_cpu(half_inputs["hidden_states"], half_inputs["w_gate_up"], half_inputs["w_down"],
                                half_inputs["topk_ids"], half_inputs["topk_weights"],
                                b_gate_up=half_inputs["b_gate_up"],
                                b_down=half_inputs["b_down"], threading="experts", **options)
    assert_within_twice_same_dtype(out, torch_out, ref_out, "output")


@pytest.mark.parametrize("kernel_max_rows", ["default", str(2**62)])
def test_bf16_products_round_to_nearest_even_in_every_tile_position(kernel_max_rows, seed, monkeypatch):
    # Every dot product here has one nonzero term, exact in float32, so each GEMM output must
    # be that product rounded to bf16 exactly as PyTorch rounds it (nearest, ties to even,
    # NaN stays NaN): x rows one-hot, each down-weight row one-hot. Experts get 2, 6 and 13
    # rows (groups of 2, 4 + 2 and 4 + 4 + 4 + 1 rows in the bf16 GEMM); H = 80 and I = 37
    # leave tails in k, in the 6-column tiles and in the rows of the tile; a token carries a NaN.
    # Every expert in the bf16 GEMM, and as the default splits them (with AMX: 6 and 13 rows to ATen).
    if kernel_max_rows != "default":
        monkeypatch.setenv("TPMOE_CPU_BF16_KERNEL_MAX_ROWS", kernel_max_rows)
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, counts = 80, 37, (2, 6, 13)
    num_tokens = sum(counts)
    topk_ids = torch.cat([torch.full((count,), expert) for expert, count in enumerate(counts)])
    topk_ids = topk_ids[torch.randperm(num_tokens, generator=generator)].view(-1, 1)
    hot = torch.randint(0, hidden, (num_tokens,), generator=generator)
    x = torch.zeros(num_tokens, hidden)
    x[torch.arange(num_tokens), hot] = torch.randn(num_tokens, generator=generator)
    x[num_tokens // 2, hot[num_tokens // 2]] = float("nan")
    x = x.bfloat16()
    w_gate_up = torch.randn(len(counts), inter, hidden, generator=generator).bfloat16()
    down_hot = torch.arange(hidden) % inter  # output column c reads h column c % I only
    w_down = torch.zeros(len(counts), hidden, inter)
    w_down[:, torch.arange(hidden), down_hot] = torch.randn(len(counts), hidden, generator=generator)
    w_down = w_down.bfloat16()
    out = fused_experts_cpu(x, w_gate_up, w_down, topk_ids, torch.ones(num_tokens, 1), threading="experts",
                            b_gate_up=None, b_down=None, **options_for("relu", "concatenated", False))

    rows = torch.arange(num_tokens)
    expert = topk_ids[:, 0]
    gate_up = (x[rows, hot].float()[:, None] * w_gate_up[expert, :, hot].float()).bfloat16()
    h = torch.relu(gate_up)
    expected = (h[:, down_hot].float() * w_down[expert[:, None], torch.arange(hidden), down_hot].float()).bfloat16()
    assert torch.equal(out.isnan(), expected.isnan())
    assert expected.isnan().any() and (~expected.isnan()).sum() > 1000
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("threading", ("auto",) + THREADINGS)
def test_bitwise_reproducible(threading, seed):
    inputs, grad_out = make_inputs(seed, 53, 40, 24, 5, 2, layout="interleaved", gated=True, bias=True)
    inputs = cast(inputs, torch.bfloat16)
    options = options_for("silu", "interleaved", True)
    first_out, first_grads = run_with_grads(native(threading), inputs, options, grad_out)
    for _ in range(2):
        out, grads = run_with_grads(native(threading), inputs, options, grad_out)
        assert torch.equal(out, first_out)
        for name, grad in first_grads.items():
            assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("num_tokens,num_experts,expected", [(1, 8, "experts"), (1100, 2, "gemm")])
def test_auto_picks_the_regime_by_rows_per_expert(num_tokens, num_experts, expected, seed):
    # Decode (few rows per expert) runs "experts", prefill (many) "gemm": auto must be
    # bitwise equal to the regime it picks.
    inputs, _ = make_inputs(seed, num_tokens, 256, 384, num_experts, 2, layout="concatenated", gated=True,
                            bias=False)
    inputs = cast(inputs, torch.float32)
    args = (inputs["hidden_states"], inputs["w_gate_up"], inputs["w_down"], inputs["topk_ids"],
            inputs["topk_weights"])
    options = dict(options_for("silu", "concatenated", True), b_gate_up=None, b_down=None)
    auto = fused_experts_cpu(*args, threading="auto", **options)
    assert torch.equal(auto, fused_experts_cpu(*args, threading=expected, **options))


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least 2 threads to compare thread counts")
def test_thread_count_changes_nothing_but_rounding(seed):
    inputs, grad_out = make_inputs(seed, 19, 40, 36, 5, 2, layout="gpt_oss", gated=True, bias=True)
    options = options_for("clamped_swiglu", "gpt_oss", True)
    threads = torch.get_num_threads()
    many_out, many_grads = run_with_grads(native("experts"), inputs, options, grad_out)
    torch.set_num_threads(1)
    try:
        one_out, one_grads = run_with_grads(native("experts"), inputs, options, grad_out)
    finally:
        torch.set_num_threads(threads)
    assert_fp32_close(one_out, many_out, "output", rtol=1e-12)
    for name, grad in many_grads.items():
        assert_fp32_close(one_grads[name], grad, f"d{name}", rtol=1e-12)


# --------------------------------------------------------------------------- raw ops

def raw_args(num_tokens=5, hidden=8, inter=6, experts=3, top_k=2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    topk_ids, topk_weights = make_routing(num_tokens, experts, top_k, generator=generator)
    routing = align(topk_ids, experts)
    return dict(hidden_states=torch.randn(num_tokens, hidden, dtype=dtype),
                w_gate_up=torch.randn(experts, 2 * inter, hidden, dtype=dtype),
                w_down=torch.randn(experts, hidden, inter, dtype=dtype),
                sorted_pair_ids=routing.sorted_pair_ids, expert_offsets=routing.expert_offsets,
                topk_weights=topk_weights, b_gate_up=None, b_down=None, activation="silu", layout="concatenated",
                gated=True, alpha=1.702, limit=7.0, threading="auto", save_gate_up=True)


def call_forward(args):
    return cpu_ops().experts_cpu_forward(*args.values())


def test_raw_forward_and_backward_output_mask(seed):
    args = raw_args()
    out, gate_up = call_forward(args)
    assert out.shape == (5, 8) and gate_up.shape == (10, 12)
    values = list(args.values())[:-1]  # the backward takes the forward's arguments but save_gate_up
    grads = cpu_ops().experts_cpu_backward(torch.randn(5, 8), *values[:8], gate_up, *values[8:],
                                           [True, False, False, True, False, False])
    assert grads[0].shape == (5, 8) and grads[3].shape == (5, 2)
    assert all(grad.numel() == 0 for grad in (grads[1], grads[2], grads[4], grads[5]))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = raw_args()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = {name: mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
                     for name, value in args.items()}
        out, gate_up = call_forward(fake_args)
    assert out.shape == (5, 8) and gate_up.shape == (10, 12)


def test_torch_compile_matches_eager(seed):
    # The fakes (tpmoe/cpu/ops.py) let dynamo trace the ops; the compiled graph must give the
    # same output and gradients as the eager call (same kernels, so equal up to rounding).
    inputs, grad_out = make_inputs(seed, 7, 16, 12, 4, 2, layout="interleaved", gated=True, bias=True)
    inputs = cast(inputs, torch.float32)
    options = options_for("gelu", "interleaved", True)
    eager_out, eager_grads = run_with_grads(native("auto"), inputs, options, grad_out)
    compiled = torch.compile(native("auto"))
    out, grads = run_with_grads(compiled, inputs, options, grad_out)
    assert_fp32_close(out, eager_out, "output")
    for name, grad in eager_grads.items():
        assert_fp32_close(grads[name], grad, f"d{name}")


BAD_INPUTS = [
    ("w_gate_up", lambda a: a["w_gate_up"].double(), "w_gate_up: expected dtype"),
    ("w_down", lambda a: a["w_down"][:, :, :5], "w_down: expected shape"),
    ("hidden_states", lambda a: a["hidden_states"][None], "hidden_states: expected a 2-D"),
    ("sorted_pair_ids", lambda a: torch.full_like(a["sorted_pair_ids"], 99), "sorted_pair_ids: expected pair"),
    ("sorted_pair_ids", lambda a: torch.zeros_like(a["sorted_pair_ids"]), "permutation"),
    ("sorted_pair_ids", lambda a: a["sorted_pair_ids"][:-1], "sorted_pair_ids: expected shape"),
    ("expert_offsets", lambda a: a["expert_offsets"] - 1, "expert_offsets: expected cumulative"),
    ("expert_offsets", lambda a: torch.tensor([0, 7, 3, 10]), "non-decreasing"),
    ("expert_offsets", lambda a: a["expert_offsets"].int(), "expert_offsets: expected int64"),
    ("topk_weights", lambda a: a["topk_weights"][:, :1], "sorted_pair_ids: expected shape"),
    ("b_down", lambda a: torch.zeros(3, 7), "b_down: expected shape"),
    ("activation", lambda a: "swish", "activation: expected"),
    ("layout", lambda a: "packed", "layout: expected"),
    ("threading", lambda a: "many", "threading: expected"),
]


@pytest.mark.parametrize("name,make_bad,message", BAD_INPUTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_raw_forward_rejects_bad_input(name, make_bad, message):
    args = raw_args()
    args[name] = make_bad(args)
    with pytest.raises(RuntimeError, match=message):
        call_forward(args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_raw_forward_knows_every_activation_and_which_need_a_gate(activation):
    # The C++ side keeps its own list of names and of the gated-only ones: both must match tpmoe.config.
    args = raw_args()
    args["activation"] = activation
    out, _ = call_forward(args)
    assert out.shape == (5, 8) and torch.isfinite(out).all()
    args.update(gated=False, w_gate_up=args["w_gate_up"][:, :6])
    if activation in GATED_ONLY_ACTIVATIONS:
        with pytest.raises(RuntimeError, match=f"gated: {activation} is a gated activation"):
            call_forward(args)
    else:
        assert call_forward(args)[0].shape == (5, 8)


def test_raw_backward_rejects_a_wrong_saved_gate_up():
    args = raw_args()
    _, gate_up = call_forward(args)
    values = list(args.values())[:-1]
    with pytest.raises(RuntimeError, match="gate_up_sorted"):
        cpu_ops().experts_cpu_backward(torch.randn(5, 8), *values[:8], gate_up[:-1], *values[8:], [True] * 6)
    with pytest.raises(RuntimeError, match="grad_output"):
        cpu_ops().experts_cpu_backward(torch.randn(4, 8), *values[:8], gate_up, *values[8:], [True] * 6)
