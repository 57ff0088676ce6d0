"""The forward kernels' structure (grid order, single-dot gate_up, split down, combine, aligned h)
under TRITON_INTERPRET=1 on CPU, against float64 torch references; and their sm_90 code.

Tiny tiles (16) through direct KernelConfig objects so every loop runs several trips, with
GROUP_M and SPLIT values that do not divide the row-block count or the depth, so the short
last group and the short / empty last split are exercised.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

from support.tolerances import assert_fp32_close
from support.triton_problems import DEVICE, expert_matrices, make_problem, row_index

pytestmark = pytest.mark.triton  # skipped where the kernels cannot run (conftest.py)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tpmoe.activations import expert_activation  # noqa: E402
from tpmoe.routing import align  # noqa: E402
from tpmoe.triton import combine, down, gate_up, ops  # noqa: E402
from tpmoe.triton.grid import grouped_tile  # noqa: E402
from tpmoe.triton.layouts import aligned_row_stride, down_axes, gate_up_axes  # noqa: E402
from tpmoe.triton.tile_configs import KernelConfig  # noqa: E402

from support import ROOT  # noqa: E402


@triton.jit
def _tile_order_kernel(out_ptr, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize("num_pid_m,num_pid_n,group_m", [(7, 3, 3), (5, 4, 8), (6, 2, 1), (1, 5, 4)])
def test_grouped_tile_order_is_a_grouped_permutation(num_pid_m, num_pid_n, group_m):
    """Every tile exactly once; programs walk a group's row blocks down one column stripe first."""
    out = torch.empty(num_pid_m * num_pid_n, 2, dtype=torch.int32, device=DEVICE)
    _tile_order_kernel[(num_pid_m * num_pid_n,)](out, num_pid_m, num_pid_n, GROUP_M=group_m)
    order = [tuple(pair) for pair in out.cpu().tolist()]
    expected = []  # the order written out by hand: groups of rows, column stripes, rows
    for first in range(0, num_pid_m, group_m):
        rows = range(first, min(first + group_m, num_pid_m))
        expected += [(m, n) for n in range(num_pid_n) for m in rows]
    assert order == expected


def _gate_up_reference(problem, layout, gated, activation, with_bias, tokens, experts):
    """h rows in float64 from the unpacked [R, H] expert matrices (gate rows, then up rows)."""
    rows = []
    for token, expert in zip(tokens.tolist(), experts.tolist()):
        w_gate_up, _ = expert_matrices(problem, layout, expert)
        row = problem["x"][token].double() @ w_gate_up.double().t()
        if with_bias:
            row = row + problem["b_gate_up"][expert].double()
        rows.append(row)
    return expert_activation(torch.stack(rows), activation=activation, layout=layout, gated=gated, alpha=1.702,
                             limit=7.0)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "not_gated"])
@pytest.mark.parametrize("layout", ["concatenated", "interleaved", "gpt_oss"])
def test_single_dot_gate_up(layout, gated, with_bias, seed):
    """One [BK, 2BN] B tile and one dot per k-step, split in the epilogue, for every layout;
    GROUP_M 3 over 5 row blocks (a short last group); an expert with no token; I = 21 (not a
    multiple of BLOCK_N); h rows 16-byte aligned."""
    activation = "clamped_swiglu" if (gated and layout == "gpt_oss") else ("silu" if gated else "gelu")
    problem = make_problem(seed, num_tokens=19, hidden=37, inter=21, layout=layout, gated=gated)
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    config = KernelConfig(16, 16, 16, 4, 2, GROUP_M=3)
    routing = align(problem["topk_ids"], problem["w_gate_up"].shape[0], config.BLOCK_M)
    assert routing.block_expert.shape[0] % config.GROUP_M != 0
    h = gate_up.gate_up(problem["x"], problem["w_gate_up"], problem["b_gate_up"] if with_bias else None,
                        routing.sorted_ids_padded, routing.block_expert, top_k=top_k, activation=activation,
                        layout=layout, gated=gated, alpha=1.702, limit=7.0, config=config)
    assert h.stride(0) == aligned_row_stride(21, h.element_size()) and h.stride(1) == 1
    rows, _, tokens, experts = row_index(routing, num_pairs, top_k)
    assert 1 not in experts.tolist()  # make_problem routes no token to expert 1
    expected = _gate_up_reference(problem, layout, gated, activation, with_bias, tokens, experts)
    assert_fp32_close(h[rows], expected, "h")
    used = int(routing.num_padded)
    padding = torch.ones(used, dtype=torch.bool, device=h.device)
    padding[rows] = False
    assert torch.count_nonzero(h[:used][padding]) == 0, "padding rows of h must be zero"


def _down_reference(problem, layout, h, rows, pairs, row_experts, num_tokens, top_k, with_bias=True):
    """y [T, H] = sum_k w[p] (h[row] W_down[e]^T + b_down[e]) in float64."""
    flat_weights = problem["topk_weights"].reshape(-1).double()
    hidden = problem["x"].shape[1]
    pair_rows = torch.zeros(num_tokens * top_k, hidden, dtype=torch.float64, device=h.device)
    for r, p, e in zip(rows.tolist(), pairs.tolist(), row_experts.tolist()):
        value = h[r].double() @ expert_matrices(problem, layout, e)[1].double().t()
        if with_bias:
            value = value + problem["b_down"][e].double()
        pair_rows[p] = flat_weights[p] * value
    return pair_rows.view(num_tokens, top_k, hidden).sum(1)


@pytest.mark.parametrize("split,group_m", [(3, 2), (4, 3), (2, 1)])
@pytest.mark.parametrize("layout", ["concatenated", "gpt_oss"])
def test_split_down_and_combine(layout, split, group_m, seed):
    """SPLIT programs per tile over I = 37 (3 BLOCK_K steps: with SPLIT 4 the last split's slice
    is empty and must still write its zero / bias-free partial), then the combine; h read
    through a padded row stride whose padding holds NaN (never read)."""
    num_tokens, inter = 17, 37
    problem = make_problem(seed, num_tokens=num_tokens, hidden=29, inter=inter, layout=layout)
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    config = KernelConfig(16, 16, 16, 4, 2, GROUP_M=group_m, SPLIT=split)
    routing = align(problem["topk_ids"], problem["w_down"].shape[0], config.BLOCK_M)
    rows, pairs, _, row_experts = row_index(routing, num_pairs, top_k)
    num_rows = routing.sorted_ids_padded.shape[0]
    generator = torch.Generator().manual_seed(seed + 1)
    storage = torch.full((num_rows, inter + 7), float("nan"), device=DEVICE)
    h = storage[:, :inter]
    h[rows] = torch.randn(len(rows), inter, generator=generator).to(DEVICE)
    h[:int(routing.num_padded)][~torch.isin(torch.arange(int(routing.num_padded), device=DEVICE), rows)] = 0.0
    hidden_axis, inter_axis = down_axes(layout)
    partials = down.grouped_scatter(h, problem["w_down"], hidden_axis, inter_axis, problem["b_down"],
                                    problem["topk_weights"], routing.sorted_ids_padded, routing.block_expert,
                                    num_pairs=num_pairs, config=config)
    assert partials.shape == (split, num_pairs, problem["x"].shape[1])
    y = combine.combine(partials, num_tokens, top_k, torch.float32)
    assert_fp32_close(y, _down_reference(problem, layout, h, rows, pairs, row_experts, num_tokens, top_k), "y")
    if split == 4:  # the empty fourth split holds exact zeros (the bias sits in split 0 only)
        assert torch.count_nonzero(partials[3]) == 0

    # dx through the same kernel on W_gate_up with a split over R = 2 I = 74.
    rows_axis, gu_hidden_axis = gate_up_axes(layout)
    d_preact = torch.zeros(num_rows, problem["w_gate_up"].shape[rows_axis], device=DEVICE)
    d_preact[rows] = torch.randn(len(rows), d_preact.shape[1], generator=generator).to(DEVICE)
    dx_partials = down.grouped_scatter(d_preact, problem["w_gate_up"], gu_hidden_axis, rows_axis, None, None,
                                       routing.sorted_ids_padded, routing.block_expert, num_pairs=num_pairs,
                                       config=config)
    dx = combine.combine(dx_partials, num_tokens, top_k, torch.float32)
    dx_pairs = torch.zeros(num_pairs, problem["x"].shape[1], dtype=torch.float64, device=DEVICE)
    for r, p, e in zip(rows.tolist(), pairs.tolist(), row_experts.tolist()):
        dx_pairs[p] = d_preact[r].double() @ expert_matrices(problem, layout, e)[0].double()
    assert_fp32_close(dx, dx_pairs.view(num_tokens, top_k, -1).sum(1), "dx")


def _combine_same_order(partials, num_tokens, top_k, acc_dtype):
    """The combine's documented order in torch: per k, that pair's splits 0..S-1, then added."""
    splits = partials.shape[0]
    view = partials.view(splits, num_tokens, top_k, -1).to(acc_dtype)
    acc = torch.zeros(num_tokens, partials.shape[-1], dtype=acc_dtype, device=partials.device)
    for k in range(top_k):
        pair_sum = torch.zeros_like(acc)
        for s in range(splits):
            pair_sum = pair_sum + view[s, :, k]
        acc = acc + pair_sum
    return acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("num_tokens,top_k,splits,width", [(1, 8, 1, 600), (5, 1, 3, 37), (1, 1, 1, 1),
                                                           (13, 3, 2, 1031)])
def test_combine_kernel(num_tokens, top_k, splits, width, dtype, seed):
    """Sum over splits and k in fp32 (fp64 for float64 partials), rounded once to the output dtype:
    bit-equal to the same order in torch, and close to the float64 sum."""
    partial_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    generator = torch.Generator().manual_seed(seed)
    partials = torch.randn(splits, num_tokens * top_k, width, generator=generator, dtype=torch.float64)
    partials = partials.to(partial_dtype).to(DEVICE)
    out = combine.combine(partials, num_tokens, top_k, dtype)
    assert out.dtype == dtype and out.shape == (num_tokens, width)
    same_order = _combine_same_order(partials, num_tokens, top_k, partial_dtype)
    assert torch.equal(out, same_order.to(dtype)), "combine must be the fixed-order sum, rounded once"
    reference = partials.double().view(splits, num_tokens, top_k, width).sum((0, 2))
    if dtype != torch.bfloat16:
        assert_fp32_close(out, reference, "combine")
    # 2-D pair rows (no split axis) are the same as one split.
    if splits == 1:
        assert torch.equal(combine.combine(partials[0], num_tokens, top_k, dtype), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_combine_of_half_pair_rows(dtype, seed):
    """Half-precision pair rows (down.pair_dtype without a split) are upcast and summed in fp32."""
    assert down.pair_dtype(dtype, 1) == dtype and down.pair_dtype(dtype, 2) == torch.float32
    generator = torch.Generator().manual_seed(seed)
    partials = torch.randn(1, 7 * 4, 45, generator=generator).to(dtype).to(DEVICE)
    out = combine.combine(partials, 7, 4, dtype)
    assert torch.equal(out, _combine_same_order(partials, 7, 4, torch.float32).to(dtype))


def test_combine_op_has_a_working_fake(seed):
    partials = torch.randn(2, 6, 19, device=DEVICE)
    torch.library.opcheck(ops.combine, (partials, 3, 2, torch.bfloat16), test_utils=("test_schema", "test_faketensor"))


def test_padded_stride_h_matches_contiguous_h(seed):
    """The down kernel reads h through its row stride: an uneven shard's aligned rows (I = 77 bf16,
    stride 80) give the same bits as a contiguous copy."""
    problem = make_problem(seed, num_tokens=11, hidden=24, inter=77, dtype=torch.bfloat16)
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    config = KernelConfig(16, 16, 16, 4, 2, GROUP_M=2, SPLIT=2)
    routing = align(problem["topk_ids"], problem["w_down"].shape[0], config.BLOCK_M)
    h = gate_up.gate_up(problem["x"], problem["w_gate_up"], problem["b_gate_up"], routing.sorted_ids_padded,
                        routing.block_expert, top_k=top_k, activation="silu", layout="concatenated", gated=True,
                        alpha=1.702, limit=7.0, config=config)
    assert h.stride(0) == 80 and not h.is_contiguous()
    outs = [down.grouped_scatter(rows, problem["w_down"], 1, 2, problem["b_down"], problem["topk_weights"].float(),
                                 routing.sorted_ids_padded, routing.block_expert, num_pairs=num_pairs, config=config)
            for rows in (h, h.contiguous())]
    assert torch.equal(outs[0], outs[1])


def test_forward_launches_only_the_three_kernels_after_align(monkeypatch, seed):
    """T = 1 through FusedExpertsFunction: after align, the forward runs gate_up, grouped_scatter
    and combine and no other op (no zero fill, no sum, no cast); output and dx against float64."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from tpmoe.reference import reference_experts
    from tpmoe.triton import fused_experts_triton

    monkeypatch.setenv("TPMOE_TRITON_CONFIG", "BLOCK_M=16,BLOCK_N=16,BLOCK_K=16,GROUP_M=2,SPLIT=3")
    problem = make_problem(seed, num_tokens=1, hidden=40, inter=50, experts=6, top_k=3, skip_expert=False)
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x = problem["x"].clone().requires_grad_(True)
    args = (problem["w_gate_up"], problem["w_down"], problem["topk_ids"], problem["topk_weights"])
    options = dict(activation="silu", layout="concatenated", gated=True, b_gate_up=problem["b_gate_up"],
                   b_down=problem["b_down"])
    with torch.no_grad(), Record():
        fused_experts_triton(problem["x"], *args, **options)
    kernels = [name for name in calls if "triton_" in name]
    assert kernels == ["tpmoe.triton_gate_up", "tpmoe.triton_grouped_scatter", "tpmoe.triton_combine"], calls
    after_align = calls[calls.index("tpmoe.triton_gate_up"):]
    assert after_align == kernels, f"extra ops around the forward kernels: {after_align}"

    y = fused_experts_triton(x, *args, **options)
    (dx,) = torch.autograd.grad(y, x, problem["dy"])
    x64 = problem["x"].double().requires_grad_(True)
    y64 = reference_experts(x64, problem["w_gate_up"].double(), problem["w_down"].double(), problem["topk_ids"],
                            problem["topk_weights"].double(), activation="silu", layout="concatenated", gated=True,
                            b_gate_up=problem["b_gate_up"].double(), b_down=problem["b_down"].double())
    (dx64,) = torch.autograd.grad(y64, x64, problem["dy"].double())
    assert_fp32_close(y, y64, "y")
    assert_fp32_close(dx, dx64, "dx")


def test_tables_fill_the_gpu_at_decode_and_go_wide_for_prefill(monkeypatch):
    """Qwen3-30B-A3B (E 128, K 8, H 2048, I 768) on a 132-SM H100/H200."""
    from tpmoe.triton import tile_configs
    monkeypatch.delenv(tile_configs.ENV_VAR, raising=False)
    configs = tile_configs.launch_configs(1, 8, 128, 2048, 768, 2 * 768)
    row_blocks = 8  # T = 1: 8 experts with one 16-row block each
    gate_up_programs = row_blocks * triton.cdiv(768, configs["gate_up"].BLOCK_N)
    assert configs["gate_up"].BLOCK_M == 16 and gate_up_programs >= 132, gate_up_programs
    assert configs["down"].SPLIT > 1 and configs["dx"].SPLIT > 1
    # A TP shard too shallow to split (I_p = 96: under two BLOCK_K steps per split) gets none.
    assert tile_configs.launch_configs(1, 8, 128, 2048, 96, 192)["down"].SPLIT == 1
    prefill = tile_configs.launch_configs(16384, 8, 128, 2048, 768, 2 * 768)
    gate_up_config, down_config = prefill["gate_up"], prefill["down"]
    assert (gate_up_config.BLOCK_M, 2 * gate_up_config.BLOCK_N, gate_up_config.num_warps) == (128, 256, 8)
    assert (down_config.BLOCK_M, down_config.BLOCK_N, down_config.num_warps) == (128, 256, 8)
    assert gate_up_config.GROUP_M > 1 and down_config.GROUP_M > 1
    assert gate_up_config.SPLIT == 1 and down_config.SPLIT == 1


_AOT_CHECK = r"""
import json, re, sys
from tpmoe.triton import aot, tile_configs
rows = []
for kernel in ("gate_up", "down"):
    for launch in aot.representative_launches([kernel]):
        compiled = aot.compile_launch(launch, 90)
        ptx = compiled.asm["ptx"]
        usage = aot.ptxas_usage(ptx)
        widths = [int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k\d+", ptx)]
        rows.append(dict(kernel=kernel, variant=launch.variant, config=list(launch.config.__dict__.values()),
                         wgmma_n=max(widths, default=0), **usage))
prefill = tile_configs.kernel_config("gate_up", 1024, 768, 2048)
print(json.dumps(dict(rows=rows, prefill=list(prefill.__dict__.values()))))
"""


@pytest.mark.slow
def test_sm90_prefill_gate_up_is_wide_and_nothing_spills():
    """sm_90 bf16: gate_up's config for buckets >= 1024 issues wgmma of n >= 128 (one dot over gate
    and up) without spills, and no gate_up / down config spills."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    if not os.path.exists(ptxas):
        pytest.skip(f"Triton's bundled ptxas-blackwell is missing at {ptxas}")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", _AOT_CHECK], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    import json
    report = json.loads(result.stdout.strip().splitlines()[-1])
    prefill = [row for row in report["rows"] if row["kernel"] == "gate_up" and row["config"] == report["prefill"]]
    assert prefill, f"the prefill config {report['prefill']} was not compiled"
    for row in prefill:
        assert row["wgmma_n"] >= 128, row
    spilling = [row for row in report["rows"] if row["spill_stores"] or row["spill_loads"]]
    assert not spilling, f"configs that spill: {spilling}"
