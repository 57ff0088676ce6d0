"""The backward kernels' structure: backward_dh's grouped (GROUP_M) grid and one-dot gate/up
recompute, backward_dw's split over rows (SPLIT) and pipelined row loop, their int64 offsets,
and d_preact's 16-byte-aligned rows.

Under TRITON_INTERPRET=1 on CPU tensors (tiny shapes), against float64 references computed
here from the inputs; the AOT checks (sm_90, bf16: no spills, backward_dh's shared memory,
the pipelined dW loop) compile in a subprocess without the interpreter, as
tests/ops/test_triton_aot.py does.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from support.experts_cases import case_inputs, case_options, run_with_grads
from support.triton_problems import DEVICE, OPTIONS, DwProblem, dh_reference, make_problem, row_index
from support.tolerances import assert_fp32_close, assert_within_twice_same_dtype

pytestmark = pytest.mark.triton  # skipped where the kernels cannot run (conftest.py)

import triton  # noqa: E402

import triton.language as tl  # noqa: E402

from tpmoe.activations import expert_activation  # noqa: E402
from tpmoe.reference import reference_experts  # noqa: E402
from tpmoe.routing import align  # noqa: E402
from tpmoe.triton import backward_dh, backward_dw, down, fused_experts_triton, tile_configs  # noqa: E402
from tpmoe.triton.layouts import aligned_row_stride, down_axes, gate_up_axes  # noqa: E402
from tpmoe.triton.tile_configs import KernelConfig  # noqa: E402

from support import ROOT  # noqa: E402


# ---------------------------------------------------------------------------------------------
# backward_dh: the grouped grid

@triton.jit
def _grouped_order_kernel(out_ptr, num_row_blocks, num_col_blocks, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = backward_dh.grouped_program(pid, num_row_blocks, num_col_blocks, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


def _grouped_order_reference(num_row_blocks, num_col_blocks, group_m):
    """The order spelled out: groups of group_m row blocks (the last one shorter), each group
    walking column block 0, 1, ... with its row blocks fastest."""
    order = []
    for first in range(0, num_row_blocks, group_m):
        rows = range(first, min(first + group_m, num_row_blocks))
        for col in range(num_col_blocks):
            order += [(row, col) for row in rows]
    return order


@pytest.mark.parametrize("num_row_blocks,num_col_blocks,group_m", [(7, 3, 3), (5, 4, 8), (1, 5, 2), (6, 1, 4),
                                                                   (4, 2, 1)])
def test_grouped_program_order(num_row_blocks, num_col_blocks, group_m):
    programs = num_row_blocks * num_col_blocks
    out = torch.full((programs, 2), -1, dtype=torch.int32, device=DEVICE)
    _grouped_order_kernel[(programs,)](out, num_row_blocks, num_col_blocks, GROUP_M=group_m)
    got = [tuple(pair) for pair in out.tolist()]
    assert got == _grouped_order_reference(num_row_blocks, num_col_blocks, group_m)
    assert sorted(got) == [(m, n) for m in range(num_row_blocks) for n in range(num_col_blocks)]  # each once


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout,gated,activation,one_dot", [
    ("concatenated", True, "silu", True), ("interleaved", True, "gelu", True),
    ("gpt_oss", True, "clamped_swiglu", True), ("concatenated", True, "silu", False),
    ("gpt_oss", True, "silu_clamped", False), ("concatenated", False, "gelu_tanh", False),
    ("gpt_oss", False, "relu", False)])
def test_backward_dh_grouped_grid(layout, gated, activation, one_dot, with_bias, seed, monkeypatch):
    """GROUP_M = 4 over 16-row blocks whose count (9) is not a multiple of 4, 3 column blocks (I = 37):
    against float64, and bit for bit the GROUP_M = 1 result (a program's tile does not depend on
    the order). Gate/up recomputed by one [BK, 2 BN] dot (what half precision runs; forced here
    on fp32 so that the fp32 bound checks it) and by two."""
    monkeypatch.setattr(backward_dh, "one_gate_up_dot", lambda gated, dtype: gated and one_dot)
    problem = make_problem(seed, num_tokens=29, hidden=41, inter=37, layout=layout, gated=gated)
    if activation in ("clamped_swiglu", "silu_clamped"):
        problem["x"] = problem["x"] * 8  # both sides of the clamps
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    routing = align(problem["topk_ids"], problem["w_gate_up"].shape[0], 16)
    num_row_blocks = routing.block_expert.shape[0]
    assert num_row_blocks % 4 != 0 and (routing.block_expert < 0).any(), "the shape must leave a short group"
    rows, h64, d_preact_expected, d_topk_expected = dh_reference(problem, layout, gated, activation, with_bias,
                                                                  routing, num_pairs, top_k)
    b_gate_up = problem["b_gate_up"] if with_bias else None
    b_down = problem["b_down"] if with_bias else None
    results = []
    for group_m in (4, 1):
        config = KernelConfig(16, 16, 16, 4, 2, GROUP_M=group_m)
        results.append(backward_dh.backward_dh(
            problem["dy"], problem["x"], problem["w_gate_up"], b_gate_up, problem["w_down"], b_down,
            problem["topk_weights"], h64.to(problem["x"].dtype), routing.sorted_ids_padded, routing.block_expert,
            top_k=top_k, activation=activation, layout=layout, gated=gated, config=config, **OPTIONS))
    (d_preact, d_topk), (d_preact_1, d_topk_1) = results
    assert_fp32_close(d_preact[rows], d_preact_expected, "d_preact")
    assert_fp32_close(d_topk.reshape(-1), d_topk_expected, "d_topk_weights")
    used = int(routing.num_padded)
    assert torch.equal(d_preact[:used], d_preact_1[:used]) and torch.equal(d_topk, d_topk_1)


# ---------------------------------------------------------------------------------------------
# backward_dw: the split over rows

def _hot_expert_problem(seed, layout):
    """47 tokens, top-2 over 5 experts: expert 0 in nearly every token's first slot (45 of 94
    rows, its segment 48 rows, 3 blocks of 16), expert 1 none, the rest spread."""
    problem = make_problem(seed, num_tokens=47, hidden=19, inter=13, experts=5, layout=layout)
    generator = torch.Generator().manual_seed(seed + 3)
    second = torch.tensor([2, 3, 4])[torch.randint(0, 3, (47,), generator=generator)]
    first = torch.zeros(47, dtype=torch.long)
    for token in (5, 30):  # two tokens go elsewhere: 45 rows, not a multiple of 16
        first[token] = 2 if second[token] != 2 else 3
    problem["topk_ids"] = torch.stack([first, second], dim=1).to(DEVICE)
    assert (problem["topk_ids"][:, 0] != problem["topk_ids"][:, 1]).all()
    return problem


@pytest.mark.parametrize("layout", ["concatenated", "gpt_oss"])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_backward_dw_split_over_rows(layout, split, seed):
    """SPLIT programs per dW tile, each a chunk of whole BLOCK_M steps of its expert's segment:
    a hot expert (chunks 32+16 or 16+16+16 rows; with 32-row steps and SPLIT 3 one chunk is
    empty), an expert with no tokens, both call sites (A sorted / A gathered and weighted), db
    with the split; against float64, and reproducible bit for bit."""
    problem = _hot_expert_problem(seed, layout)
    dw = DwProblem(problem, layout, 16, seed + 2)
    segments = (dw.routing.padded_offsets[1:] - dw.routing.padded_offsets[:-1]).tolist()
    assert segments[0] == 48 and segments[1] == 0, segments
    for block_m in (16, 32):  # reduction steps of the alignment's size, and twice it (steps end mid-segment)
        config = KernelConfig(block_m, 16, 16, 4, 2, SPLIT=split)
        results = dw.run(config)
        dw.check(results, f" BLOCK_M={block_m}")
        for first, second in zip(results, dw.run(config)):
            assert torch.equal(first, second), "a fixed-order reduction: the same bits every run"


def test_backward_dw_split_without_bias_and_fp64(seed):
    """SPLIT 2 with no bias gradient (db absent: the partial holds dW only), in float64
    (fp64 partials): against float64 at the fp32 bound."""
    problem = make_problem(seed, num_tokens=31, hidden=17, inter=11, dtype=torch.float64)
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    routing = align(problem["topk_ids"], 5, 16)
    rows, _, tokens, row_experts = row_index(routing, num_pairs, top_k)
    d_preact = torch.zeros(routing.sorted_ids_padded.shape[0], 22, dtype=torch.float64, device=DEVICE)
    d_preact[rows] = torch.randn(len(rows), 22, dtype=torch.float64).to(DEVICE)
    dw, db = backward_dw.backward_dw(d_preact, problem["x"], None, routing.sorted_ids_padded, routing.padded_offsets,
                                     problem["w_gate_up"], 1, 2, num_pairs=num_pairs, top_k=top_k, a_gathered=False,
                                     b_gathered=True, bias_grad=False, config=KernelConfig(16, 16, 16, 4, 2, SPLIT=2))
    assert db is None and dw.dtype == torch.float64
    for expert in range(5):
        mine = row_experts == expert
        expected = d_preact[rows[mine]].t() @ problem["x"][tokens[mine]]
        assert_fp32_close(dw[expert], expected, f"dW[{expert}]")


@pytest.mark.parametrize("layout", ["concatenated", "gpt_oss"])
@pytest.mark.parametrize("split", [1, 2])
def test_backward_dw_grouped_order(layout, split, seed):
    """The expert-major 1-D grid with the dW tiles in grouped order: 3 x 3 (dW_gate_up, R = 42,
    H = 37) and 3 x 2 (dW_down) tiles of 16, GROUP_M 2 and 4 (neither divides 3), SPLIT 1 and 2,
    an expert with no tokens: bit for bit the GROUP_M = 1 result (the order only permutes the
    programs) and against float64."""
    problem = make_problem(seed, num_tokens=29, hidden=37, inter=21, layout=layout)  # skips an expert
    dw = DwProblem(problem, layout, 16, seed + 5)
    assert any((dw.row_experts == e).sum() == 0 for e in range(dw.num_experts)), "the problem has an empty expert"

    def run(group_m):
        return dw.run(KernelConfig(16, 16, 16, 4, 2, GROUP_M=group_m, SPLIT=split))

    baseline = run(1)
    for group_m in (2, 4):
        for name, first, second in zip(("dW_gate_up", "db_gate_up", "dW_down", "db_down"), baseline, run(group_m)):
            assert torch.equal(first, second), f"{name}: GROUP_M={group_m} differs from GROUP_M=1"
    dw.check(baseline)


def test_split_choice(monkeypatch):
    """SPLIT > 1 only where few experts with many rows leave the grid short of the GPU's SMs."""
    monkeypatch.delenv(tile_configs.ENV_VAR, raising=False)
    # Qwen3-30B-A3B at TP 1 (E = 128): tens of thousands of tiles, no split, no extra launch.
    configs = tile_configs.launch_configs(4096, 8, 128, 2048, 768, 1536)
    assert configs["backward_dw_gate_up"].SPLIT == configs["backward_dw_down"].SPLIT == 1
    # Decode: few rows per expert, no split whatever E.
    assert tile_configs.launch_configs(4, 2, 4, 512, 128, 256)["backward_dw_down"].SPLIT == 1
    # 4 experts, 4096 rows each, dW tiles 4 x 2 x 8 = 64 < 132 SMs: split.
    configs = tile_configs.launch_configs(8192, 2, 4, 512, 128, 256)
    for launch in ("backward_dw_gate_up", "backward_dw_down"):
        config = configs[launch]
        assert 1 < config.SPLIT <= tile_configs.MAX_SPLIT, (launch, config)
        tiles = 4 * -(-512 // config.BLOCK_N) * -(-256 // config.BLOCK_K)
        assert tiles < tile_configs.NUM_SMS
    # Chosen from the largest expert, not the average: E 8, dW tiles 8 x 2 x 2 = 32 < 132 SMs.
    # 4096 pairs spread evenly (512 rows each) give one 512-row split; the same pairs with one
    # hot expert of 2048 rows split it in four.
    bound = tile_configs.launch_configs(2048, 2, 8, 256, 128, 256)
    for launch, (n, k) in {"backward_dw_gate_up": (256, 256), "backward_dw_down": (256, 128)}.items():
        even = tile_configs.backward_dw_split(512, 8, n, k, bound[launch])
        hot = tile_configs.backward_dw_split(2048, 8, n, k, bound[launch])
        assert even == 1, (launch, even)
        assert hot == 2048 // tile_configs.MIN_ROWS_PER_SPLIT, (launch, hot)
        # The launch takes the bound, T rows (every token on one expert): the hot case.
        assert bound[launch].SPLIT == hot, (launch, bound[launch])
    # TPMOE_TRITON_CONFIG's SPLIT wins; 0 is refused.
    monkeypatch.setenv(tile_configs.ENV_VAR, "SPLIT=3")
    assert tile_configs.launch_configs(4096, 8, 128, 2048, 768, 1536)["backward_dw_down"].SPLIT == 3
    for text in ("SPLIT=0", "GROUP_M=0"):
        monkeypatch.setenv(tile_configs.ENV_VAR, text)
        with pytest.raises(ValueError, match=">= 1"):
            tile_configs.env_config()


# ---------------------------------------------------------------------------------------------
# int64 offsets

@triton.jit
def _offset_kernel(index_ptr, out_ptr, wrapped_ptr, stride):
    index = tl.load(index_ptr)  # int32, as a program id or an int32 column index is
    tl.store(out_ptr, backward_dh.wide_offset(index, stride))
    tl.store(wrapped_ptr, (index * stride).to(tl.int64))


def test_wide_offset_does_not_wrap():
    """pid_n * stride_wpb past 2^31 (cdiv(I_p, BLOCK_N) * T * K = 40000 * 70000): wide_offset keeps
    it exact where the plain int32 product wraps (so the check can fail). The d_weight_partial
    store of backward_dh and its other index * stride products go through it."""
    index = torch.tensor([40000], dtype=torch.int32, device=DEVICE)
    out = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    wrapped = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    _offset_kernel[(1,)](index, out, wrapped, 70000)
    assert out.item() == 40000 * 70000 > 2 ** 31
    assert wrapped.item() != 40000 * 70000
    import inspect
    source = inspect.getsource(backward_dh.backward_dh_kernel.fn)
    assert "wide_offset(pid_n, stride_wpb)" in source


# ---------------------------------------------------------------------------------------------
# d_preact rows aligned to 16 bytes

@pytest.mark.parametrize("inter,dtype", [(77, torch.float32), (154, torch.bfloat16), (77, torch.bfloat16)],
                         ids=["77-fp32", "154-bf16", "77-bf16"])
def test_d_preact_rows_are_aligned_and_read_by_dx_and_dw(inter, dtype, seed):
    """Uneven shards (I_p = 77, 154: R = 154, 308, rows of 616 bytes fp32, 308 and 616 bf16):
    d_preact's row stride is padded to 16 bytes, and the dx launch and backward_dw read it by its
    strides (against float64 from d_preact's own values)."""
    problem = make_problem(seed, num_tokens=7, hidden=16, inter=inter, experts=3, skip_expert=False, dtype=dtype)
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    routing = align(problem["topk_ids"], 3, 16)
    h = torch.zeros(routing.sorted_ids_padded.shape[0], inter, dtype=dtype, device=DEVICE)
    config = KernelConfig(16, 64, 16, 4, 2, GROUP_M=2)
    d_preact, _ = backward_dh.backward_dh(
        problem["dy"], problem["x"], problem["w_gate_up"], problem["b_gate_up"], problem["w_down"], problem["b_down"],
        problem["topk_weights"].float(), h, routing.sorted_ids_padded, routing.block_expert, top_k=top_k,
        activation="silu", layout="concatenated", gated=True, config=config, **OPTIONS)
    rows_r, size = 2 * inter, d_preact.element_size()
    assert d_preact.shape[1] == rows_r and d_preact.stride(1) == 1
    assert d_preact.stride(0) == aligned_row_stride(rows_r, size) and d_preact.stride(0) * size % 16 == 0
    assert d_preact.stride(0) > rows_r, "these shapes must need the padding"
    rows, pairs, tokens, row_experts = row_index(routing, num_pairs, top_k)
    dx_pairs = down.grouped_scatter(d_preact, problem["w_gate_up"], 2, 1, None, None, routing.sorted_ids_padded,
                                    routing.block_expert, num_pairs=num_pairs, config=config)[0]
    # Pair rows: the operands' products summed in fp32, rounded once to the pair dtype
    # (down.pair_dtype: bf16 rows for a bf16 run without a split).
    expected = torch.stack([d_preact[r].double() @ problem["w_gate_up"][e].double()
                            for r, e in zip(rows.tolist(), row_experts.tolist())])
    assert dx_pairs.dtype == down.pair_dtype(dtype, 1)
    assert_fp32_close(dx_pairs[pairs], expected.to(dx_pairs.dtype).double() if dtype != torch.float32 else expected,
                      "dx pair rows")
    dw, db = backward_dw.backward_dw(d_preact, problem["x"], None, routing.sorted_ids_padded, routing.padded_offsets,
                                     problem["w_gate_up"], 1, 2, num_pairs=num_pairs, top_k=top_k, a_gathered=False,
                                     b_gathered=True, bias_grad=True, config=KernelConfig(16, 64, 16, 4, 2))
    for expert in range(3):
        a_rows, b_rows = d_preact[rows[row_experts == expert]], problem["x"][tokens[row_experts == expert]]
        expected_dw, expected_db = a_rows.double().t() @ b_rows.double(), a_rows.double().sum(0)
        if dtype == torch.float32:
            assert_fp32_close(dw[expert], expected_dw, f"dW_gate_up[{expert}]")
            assert_fp32_close(db[expert], expected_db, f"db_gate_up[{expert}]")
        else:  # rounded once to bf16: within twice a bf16 torch run (tests/support/tolerances.py)
            floor = torch.finfo(dtype).eps / 2
            assert_within_twice_same_dtype(dw[expert], a_rows.t() @ b_rows, expected_dw, f"dW_gate_up[{expert}]",
                                           floor=floor)
            assert_within_twice_same_dtype(db[expert], a_rows.sum(0), expected_db, f"db_gate_up[{expert}]",
                                           floor=floor)


@pytest.mark.parametrize("pinned", [None, "BLOCK_M=16,BLOCK_N=32,BLOCK_K=16,num_warps=4,num_stages=2,GROUP_M=2,SPLIT=3"],
                         ids=["tables", "split3"])
def test_uneven_shard_end_to_end(pinned, seed, monkeypatch):
    """The whole forward and backward at I_p = 77 (R = 154), fp32, against tpmoe.reference: with
    the tables' configs, and pinned to a grouped grid and SPLIT = 3 (one expert holding most
    rows: the autograd path through the split and its sum)."""
    if pinned:
        monkeypatch.setenv(tile_configs.ENV_VAR, pinned)
    else:
        monkeypatch.delenv(tile_configs.ENV_VAR, raising=False)
    case = ((41, 24, 77, 4, 2, "concatenated", True, "silu", True, "one_expert") if pinned else
            (13, 24, 77, 4, 2, "concatenated", True, "silu", True, "random"))
    inputs, grad_out = case_inputs(case, seed)
    options = case_options(case)
    ref_out, ref_grads = run_with_grads(reference_experts, inputs, options, grad_out, torch.float64)
    out, grads = run_with_grads(fused_experts_triton, inputs, options, grad_out, torch.float32, DEVICE)
    assert_fp32_close(out, ref_out, "output")
    for name, grad in ref_grads.items():
        assert_fp32_close(grads[name], grad, f"d{name}")


# ---------------------------------------------------------------------------------------------
# Ahead of time, sm_90 bf16

AOT_SCRIPT = r"""
import json, re, sys
from dataclasses import replace
from tpmoe.triton import aot, backward_dw, tile_configs

rows = []
def record(launch, compiled):
    ptx = compiled.asm["ptx"]
    usage = aot.ptxas_usage(ptx)
    tile_buffers = [int(n) for n in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])]
    rows.append(dict(kernel=launch.kernel_name, variant=launch.variant, config=launch.config.__dict__,
                     shared=compiled.metadata.shared, wgmma=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
                     tile_buffers=tile_buffers, **usage))

for layout in ("concatenated", "gpt_oss"):
    for launch in aot.representative_launches(["backward_dh", "backward_dw"], layout=layout):
        record(launch, aot.compile_launch(launch, 90))
# SPLIT = 2: the table's configs carry SPLIT = 1, the split variant is compiled here.
split_configs = [replace(config, SPLIT=2) for config in tile_configs.all_configs("backward_dw")]
original = tile_configs.all_configs
tile_configs.all_configs = lambda name, capability=None: (split_configs if name == "backward_dw"
                                                          else original(name, capability))
for launch in aot.representative_launches(["backward_dw"]):
    record(launch, aot.compile_launch(launch, 90))
# The split sum that a SPLIT > 1 launch adds (the aot recorder checks that it is launched).
split_sums = aot.representative_launches(["split_sum"])
for launch in split_sums:
    record(launch, aot.compile_launch(launch, 90))
json.dump(dict(rows=rows, main_dh=aot.main_config("backward_dh").__dict__, split_sums=len(split_sums)), open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_aot_sm90_backward_configs(tmp_path):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    if not os.path.exists(ptxas):
        pytest.skip(f"Triton's bundled ptxas-blackwell is missing at {ptxas}")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(out)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    for row in rows:
        print(row["kernel"], row["variant"], row["config"], row["shared"], row["wgmma"], row["registers"],
              row["spill_stores"], row["tile_buffers"])
    assert {row["kernel"] for row in rows} == {"backward_dh", "backward_dw", "split_sum"}
    assert any(row["config"]["SPLIT"] == 2 for row in rows) and report["split_sums"] > 0
    spilling = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
    assert not spilling, f"configs that spill: {spilling}"
    main = [row for row in rows if row["kernel"] == "backward_dh" and row["config"] == report["main_dh"]]
    assert main
    for row in main:
        # Two CTAs per SM (227 KB), and one warpgroup owning the 64-row tile: the gate/up dot is
        # 2 BLOCK_N wide (m64n128), not the m64n32 of a tile split over two warpgroups.
        assert row["shared"] <= 100 * 1024, row
        assert "m64n128k16" in row["wgmma"], row
    for row in rows:
        if row["kernel"] == "backward_dw" and row["wgmma"]:
            # The row loop is pipelined: its indirect loads' tiles get num_stages - 2 buffers (the
            # narrow-N config, N <= 32, runs mma.sync with A through registers: 2 buffers for B).
            assert max(row["tile_buffers"], default=0) >= row["config"]["num_stages"] - 2, row
