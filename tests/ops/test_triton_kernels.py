"""Each Triton kernel alone (under TRITON_INTERPRET=1 on CPU) against a plain torch computation.

Small blocks (16) are forced through TPMOE_TRITON_CONFIG so that every loop runs several
trips and every mask (rows, columns, depth) is exercised on shapes that are not multiples
of a block.
"""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from support.tolerances import assert_fp32_close
from support.triton_problems import DEVICE, DwProblem, expert_matrices, make_problem, row_index

pytestmark = pytest.mark.triton  # skipped where the kernels cannot run (conftest.py)

from tpmoe.activations import expert_activation  # noqa: E402
from tpmoe.config import GATED_ONLY_ACTIVATIONS  # noqa: E402
from tpmoe.triton import backward_dh, backward_dw, combine, down, gate_up, tile_configs  # noqa: E402
from tpmoe.triton.tile_configs import KernelConfig  # noqa: E402
from tpmoe.triton.layouts import down_axes, gate_up_axes, paired_load  # noqa: E402
from tpmoe.routing import align  # noqa: E402

SMALL = KernelConfig(16, 16, 16, 4, 2)


def preactivation(problem, layout, rows_tokens, rows_experts):
    """[S_real, R] = x W_gu[e]^T + b for each real row, in float64."""
    out = []
    for token, expert in zip(rows_tokens.tolist(), rows_experts.tolist()):
        w_gate_up, _ = expert_matrices(problem, layout, expert)
        out.append(problem["x"][token].double() @ w_gate_up.double().t() + problem["b_gate_up"][expert].double())
    return torch.stack(out)


@pytest.mark.parametrize("layout,gated,activation", [
    ("concatenated", True, "silu"), ("interleaved", True, "gelu"), ("gpt_oss", True, "clamped_swiglu"),
    ("concatenated", False, "gelu_tanh"), ("gpt_oss", False, "relu"), ("concatenated", True, "clamped_silu"),
    ("interleaved", True, "silu_clamped"), ("gpt_oss", True, "softcapped_swiglu"), ("interleaved", False, "relu2")])
def test_gate_up_kernel(layout, gated, activation, seed):
    check_gate_up(layout, gated, activation, seed, SMALL)


def sm80_only_configs(kernel):
    """The configs the sm_80 tables hold in place of sm_90's (tile_configs: where those spill on
    sm_80). The interpreter ignores num_warps and num_stages, so these run the new tile shapes."""
    sm90 = tile_configs.all_configs(kernel, 90)
    return [config for config in tile_configs.all_configs(kernel, 80) if config not in sm90]


@pytest.mark.parametrize("config", sm80_only_configs("gate_up"), ids=str)
def test_gate_up_kernel_at_sm80_tiles(config, seed):
    check_gate_up("interleaved", True, "silu", seed, config)


def check_gate_up(layout, gated, activation, seed, config):
    problem = make_problem(seed, layout=layout, gated=gated)
    if activation in GATED_ONLY_ACTIVATIONS:
        problem["x"] = problem["x"] * 8  # reach both sides of the clamps, the softcaps' saturation
    top_k = problem["topk_ids"].shape[1]
    num_pairs = problem["topk_ids"].numel()
    routing = align(problem["topk_ids"], problem["w_gate_up"].shape[0], config.BLOCK_M)
    h = gate_up.gate_up(problem["x"], problem["w_gate_up"], problem["b_gate_up"], routing.sorted_ids_padded,
                        routing.block_expert, top_k=top_k, activation=activation, layout=layout, gated=gated,
                        alpha=1.702, limit=7.0, config=config)
    rows, _, tokens, experts = row_index(routing, num_pairs, top_k)
    expected = expert_activation(preactivation(problem, layout, tokens, experts), activation=activation,
                                 layout=layout, gated=gated, alpha=1.702, limit=7.0)
    assert_fp32_close(h[rows], expected, "h")
    padding = torch.ones(int(routing.num_padded), dtype=torch.bool, device=h.device)
    padding[rows] = False
    assert torch.count_nonzero(h[: int(routing.num_padded)][padding]) == 0, "padding rows of h must be zero"


@pytest.mark.parametrize("layout", ["concatenated", "gpt_oss"])
def test_grouped_scatter_kernel_down_and_dx(layout, seed):
    check_grouped_scatter(layout, seed, SMALL)


@pytest.mark.parametrize("config", sm80_only_configs("down"), ids=str)
def test_grouped_scatter_kernel_at_sm80_tiles(config, seed):
    check_grouped_scatter("concatenated", seed, config)


def check_grouped_scatter(layout, seed, config):
    problem = make_problem(seed, layout=layout)
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    experts = problem["w_gate_up"].shape[0]
    routing = align(problem["topk_ids"], experts, config.BLOCK_M)
    rows, pairs, _, row_experts = row_index(routing, num_pairs, top_k)
    num_rows = routing.sorted_ids_padded.shape[0]
    generator = torch.Generator().manual_seed(seed + 1)
    h = torch.randn(num_rows, problem["w_down"].shape[down_axes(layout)[1]], generator=generator).to(DEVICE)
    hidden_axis, inter_axis = down_axes(layout)
    out = down.grouped_scatter(h, problem["w_down"], hidden_axis, inter_axis, problem["b_down"],
                               problem["topk_weights"], routing.sorted_ids_padded, routing.block_expert,
                               num_pairs=num_pairs, config=config)[0]  # [SPLIT = 1, num_pairs, N]
    flat_weights = problem["topk_weights"].reshape(-1).double()
    expected = torch.stack([
        flat_weights[p] * (h[r].double() @ expert_matrices(problem, layout, e)[1].double().t()
                           + problem["b_down"][e].double())
        for r, p, e in zip(rows.tolist(), pairs.tolist(), row_experts.tolist())])
    assert_fp32_close(out[pairs], expected, "down pair rows")
    combined = combine.combine(out, problem["x"].shape[0], top_k, torch.float32)
    assert_fp32_close(combined, out.view(-1, top_k, out.shape[1]).double().sum(1), "combine")

    # dx: d_preact [M, R] times W_gate_up[e] read as [N = H, Kdim = R].
    d_preact = torch.randn(num_rows, problem["w_gate_up"].shape[gate_up_axes(layout)[0]],
                           generator=generator).to(DEVICE)
    rows_axis, gu_hidden_axis = gate_up_axes(layout)
    dx_pairs = down.grouped_scatter(d_preact, problem["w_gate_up"], gu_hidden_axis, rows_axis, None, None,
                                    routing.sorted_ids_padded, routing.block_expert, num_pairs=num_pairs,
                                    config=config)[0]
    expected = torch.stack([d_preact[r].double() @ expert_matrices(problem, layout, e)[0].double()
                            for r, e in zip(rows.tolist(), row_experts.tolist())])
    assert_fp32_close(dx_pairs[pairs], expected, "dx pair rows")


@pytest.mark.parametrize("layout,gated,activation", [
    ("concatenated", True, "silu"), ("interleaved", True, "gelu_tanh"), ("gpt_oss", True, "clamped_swiglu"),
    ("concatenated", False, "gelu"), ("interleaved", False, "relu"), ("interleaved", True, "clamped_silu"),
    ("gpt_oss", True, "silu_clamped"), ("concatenated", True, "softcapped_swiglu"), ("gpt_oss", False, "relu2")])
def test_backward_dh_kernel(layout, gated, activation, seed):
    check_backward_dh(layout, gated, activation, seed, SMALL)


@pytest.mark.parametrize("config", sm80_only_configs("backward_dh"), ids=str)
def test_backward_dh_kernel_at_sm80_tiles(config, seed):
    check_backward_dh("gpt_oss", True, "clamped_swiglu", seed, config)


def check_backward_dh(layout, gated, activation, seed, config):
    problem = make_problem(seed, layout=layout, gated=gated)
    if activation in GATED_ONLY_ACTIVATIONS:
        problem["x"] = problem["x"] * 8
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    routing = align(problem["topk_ids"], problem["w_gate_up"].shape[0], config.BLOCK_M)
    options = dict(top_k=top_k, activation=activation, layout=layout, gated=gated, alpha=1.702, limit=7.0)
    # h from the small config, aligned as this call's rows (the gate_up kernel is tested above).
    h = gate_up.gate_up(problem["x"], problem["w_gate_up"], problem["b_gate_up"], routing.sorted_ids_padded,
                        routing.block_expert, config=replace(SMALL, BLOCK_M=config.BLOCK_M), **options)
    d_preact, d_topk_weights = backward_dh.backward_dh(
        problem["dy"], problem["x"], problem["w_gate_up"], problem["b_gate_up"], problem["w_down"],
        problem["b_down"], problem["topk_weights"], h, routing.sorted_ids_padded, routing.block_expert,
        config=config, **options)

    rows, pairs, tokens, experts = row_index(routing, num_pairs, top_k)
    preact = preactivation(problem, layout, tokens, experts).requires_grad_(True)
    h_expected = expert_activation(preact, activation=activation, layout=layout, gated=gated, alpha=1.702,
                                   limit=7.0)
    flat_weights = problem["topk_weights"].reshape(-1).double()
    dy_rows = problem["dy"][tokens].double()
    w_down_rows = torch.stack([expert_matrices(problem, layout, e)[1].double() for e in experts.tolist()])
    dh_expected = flat_weights[pairs, None] * torch.einsum("sh,shi->si", dy_rows, w_down_rows)
    (d_preact_expected,) = torch.autograd.grad(h_expected, preact, dh_expected)
    assert_fp32_close(d_preact[rows], d_preact_expected, "d_preact")

    # d topk_weights = dy . o with o = h W_down^T + b_down, o computed from the kernel's own h.
    o = torch.einsum("si,shi->sh", h[rows].double(), w_down_rows) + problem["b_down"][experts].double()
    expected = torch.zeros(num_pairs, dtype=torch.float64, device=pairs.device)
    expected[pairs] = (dy_rows * o).sum(-1)
    assert_fp32_close(d_topk_weights.reshape(-1), expected, "d_topk_weights")


@pytest.mark.parametrize("layout", ["concatenated", "gpt_oss"])
def test_backward_dw_kernel(layout, seed):
    dw = DwProblem(make_problem(seed, layout=layout, num_tokens=29), layout, SMALL.BLOCK_M, seed + 2)
    # A 32-row reduction chunk over 16-aligned segments: chunks end mid-segment too.
    dw.check(dw.run(KernelConfig(32, 16, 16, 4, 2)))


def test_ops_have_working_fakes(seed):
    """torch.library.opcheck: schema and fake (meta) implementations of every launch."""
    from tpmoe.triton import ops
    problem = make_problem(seed, num_tokens=7, hidden=16, inter=16, experts=3)
    top_k, num_pairs = problem["topk_ids"].shape[1], problem["topk_ids"].numel()
    routing = align(problem["topk_ids"], 3, 16)
    config = ops.config_list(SMALL)
    tests = ("test_schema", "test_faketensor")
    h_args = (problem["x"], problem["w_gate_up"], problem["b_gate_up"], routing.sorted_ids_padded,
              routing.block_expert, top_k, "silu", "concatenated", True, 1.702, 7.0, config)
    torch.library.opcheck(ops.gate_up, h_args, test_utils=tests)
    h = ops.gate_up(*h_args)
    torch.library.opcheck(ops.grouped_scatter, (h, problem["w_down"], 1, 2, problem["b_down"], problem["topk_weights"],
                                                routing.sorted_ids_padded, routing.block_expert, num_pairs, config),
                          test_utils=tests)
    dh_args = (problem["dy"], problem["x"], problem["w_gate_up"], problem["b_gate_up"], problem["w_down"],
               problem["b_down"], problem["topk_weights"], h, routing.sorted_ids_padded, routing.block_expert,
               top_k, "silu", "concatenated", True, 1.702, 7.0, config)
    torch.library.opcheck(ops.backward_dh, dh_args, test_utils=tests)
    d_preact, _ = ops.backward_dh(*dh_args)
    torch.library.opcheck(ops.backward_dw, (d_preact, problem["x"], None, routing.sorted_ids_padded,
                                            routing.padded_offsets, problem["w_gate_up"], 1, 2, num_pairs, top_k,
                                            False, True, True, config), test_utils=tests)


def test_env_config_selects_one_fixed_config(monkeypatch):
    monkeypatch.setenv(tile_configs.ENV_VAR, "BLOCK_M=32,BLOCK_N=16,num_warps=2")
    for kernel in tile_configs.KERNELS:
        config = tile_configs.kernel_config(kernel, 4096, 1024, 1024)
        assert (config.BLOCK_M, config.BLOCK_N, config.num_warps) == (32, 16, 2)
    assert tile_configs.block_m_for(1) == 32
    monkeypatch.setenv(tile_configs.ENV_VAR, "BLOCK_N=24")
    with pytest.raises(ValueError, match="power of two"):
        tile_configs.kernel_config("down", 16, 64, 64)
    monkeypatch.setenv(tile_configs.ENV_VAR, "BLOCK_Q=16")
    with pytest.raises(ValueError, match=tile_configs.ENV_VAR):
        tile_configs.kernel_config("down", 16, 64, 64)


def test_configs_are_keyed_on_tokens_and_width(monkeypatch):
    monkeypatch.delenv(tile_configs.ENV_VAR, raising=False)
    assert tile_configs.token_bucket(1, 8, 128) == 1
    assert tile_configs.block_m_for(tile_configs.token_bucket(1, 8, 128)) == 16
    assert tile_configs.block_m_for(tile_configs.token_bucket(16384, 8, 128)) == 128
    assert tile_configs.kernel_config("gate_up", 32, 16, 2048).BLOCK_N == 32   # narrow I_p shard
    assert tile_configs.kernel_config("gate_up", 32, 768, 2048).BLOCK_N == 64
    for kernel in tile_configs.KERNELS:
        for bucket in (1, 64, 4096):
            assert tile_configs.kernel_config(kernel, bucket, 768, 2048) in tile_configs.all_configs(kernel)


@pytest.mark.parametrize("num_experts, top_k, tokens_by_block_m", [
    # Qwen3-30B-A3B: where vLLM's tuned H200 table (E 128, N 768) crosses over, in tokens.
    (128, 8, {256: 16, 512: 64, 1024: 128, 8192: 128}),
    # Mixtral-8x7B: the same rows per expert at 16x fewer tokens.
    (8, 2, {64: 16, 128: 64, 256: 128}),
])
def test_block_m_follows_rows_per_expert(monkeypatch, num_experts, top_k, tokens_by_block_m):
    """BLOCK_M from the average rows per expert (16 up to 16, 64 up to 32, 128 from 64), not from
    the token count: the former rule kept Qwen3-30B-A3B on 64-row tiles up to T = 8192."""
    monkeypatch.delenv(tile_configs.ENV_VAR, raising=False)
    for num_tokens, block_m in tokens_by_block_m.items():
        bucket = tile_configs.token_bucket(num_tokens, top_k, num_experts)
        assert tile_configs.block_m_for(bucket) == block_m, (num_tokens, bucket)
        configs = tile_configs.launch_configs(num_tokens, top_k, num_experts, 2048, 768, 1536)
        for launch in ("gate_up", "down", "backward_dh", "dx"):  # one alignment for the call
            assert configs[launch].BLOCK_M == block_m, (num_tokens, launch)
    # Qwen3 at T = 1024: the wide prefill tile (one [128, 256] gate/up accumulator).
    gate_up = tile_configs.launch_configs(1024, 8, 128, 2048, 768, 1536)["gate_up"]
    assert (gate_up.BLOCK_M, 2 * gate_up.BLOCK_N, gate_up.BLOCK_K) == (128, 256, 64)


def test_sm80_tables_differ_from_sm90_only_where_sm90_spills_on_sm80(monkeypatch):
    """launch_configs by compute capability: sm_80 (and any capability below 9.0) takes its own
    config exactly for the launches whose sm_90 config spills on sm_80 (ptxas, the AOT test);
    sm_90 and above, and None (the benchmarks' default), keep the sm_90 tables; BLOCK_M, the
    routing alignment, never depends on the device."""
    monkeypatch.delenv(tile_configs.ENV_VAR, raising=False)
    sm80 = {  # (BLOCK_M, launch) -> the sm_80 config; every other launch is sm_90's
        (64, "backward_dh"): KernelConfig(64, 64, 32, 8, 4, GROUP_M=8),
        (128, "gate_up"): KernelConfig(128, 64, 64, 8, 3, GROUP_M=8),
        (128, "down"): KernelConfig(128, 128, 64, 8, 3, GROUP_M=8),
        (128, "dx"): KernelConfig(128, 128, 64, 8, 3, GROUP_M=8),
        (128, "backward_dh"): KernelConfig(128, 32, 64, 8, 3, GROUP_M=8),
        (128, "backward_dw_gate_up"): KernelConfig(64, 128, 64, 8, 5, GROUP_M=32),
        (128, "backward_dw_down"): KernelConfig(64, 128, 64, 8, 5, GROUP_M=32),
    }
    # Qwen3-30B-A3B (E 128, K 8, H 2048) at decode, 64-row and 128-row tiles; I_p 768 and a
    # narrow shard (I_p 32, where backward_dh takes its narrow-N entry).
    for num_tokens in (1, 512, 16384):
        for inter in (768, 32):
            args = (num_tokens, 8, 128, 2048, inter, 2 * inter)
            default, hopper = tile_configs.launch_configs(*args), tile_configs.launch_configs(*args, capability=90)
            assert default == hopper == tile_configs.launch_configs(*args, capability=100)
            for capability in (80, 86, 89):
                ampere = tile_configs.launch_configs(*args, capability=capability)
                block_m = hopper["gate_up"].BLOCK_M
                for launch, config in ampere.items():
                    expected = hopper[launch]
                    if launch == "backward_dh" and block_m == 64 and inter <= 32:
                        expected = KernelConfig(64, 32, 32, 4, 3, GROUP_M=8)
                    elif (block_m, launch) in sm80:
                        # SPLIT is chosen per call from the tile count (backward_dw_split).
                        expected = replace(sm80[block_m, launch], SPLIT=config.SPLIT)
                    assert config == expected, (num_tokens, inter, capability, launch)
                    assert config.BLOCK_M == hopper[launch].BLOCK_M or launch.startswith("backward_dw")
    for kernel in tile_configs.KERNELS:
        assert set(tile_configs.all_configs(kernel)) == set(tile_configs.all_configs(kernel, 90))
    for bad in (0, -80, 8.0, "80", True):
        with pytest.raises(ValueError, match="capability"):
            tile_configs.launch_configs(16, 8, 128, 2048, 768, 1536, capability=bad)


def test_cpu_tensors_without_the_interpreter_raise_clearly():
    """Without TRITON_INTERPRET the kernels are compiled-only: CPU tensors get a RuntimeError saying so."""
    code = (
        "import torch, tpmoe.triton as t\n"
        "x = torch.randn(3, 16); w = torch.randn(2, 32, 16); wd = torch.randn(2, 16, 16)\n"
        "ids = torch.tensor([[0], [1], [0]]); tw = torch.ones(3, 1)\n"
        "try:\n"
        "    t.fused_experts_triton(x, w, wd, ids, tw, activation='silu', layout='concatenated', gated=True,\n"
        "                           b_gate_up=None, b_down=None, alpha=1.702, limit=7.0)\n"
        "except RuntimeError as error:\n"
        "    print('RAISED', error)\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    from support import ROOT as root
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED" in result.stdout, result.stdout + result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout


@pytest.mark.parametrize("activation", ["silu", "clamped_swiglu"])
def test_paired_gate_up_load_matches_separate_loads(activation, seed):
    """gpt_oss bf16 weights load gate and up as one tile and split it (layouts.paired_load); a
    transposed view of the same values takes the two-load path: both must give identical bits."""
    problem = make_problem(seed, layout="gpt_oss", dtype=torch.bfloat16)
    contiguous = problem["w_gate_up"]                                  # [E, H, 2I], 2I contiguous
    strided = contiguous.transpose(1, 2).contiguous().transpose(1, 2)  # same values, H contiguous
    assert paired_load(contiguous, 2, True, 2) and not paired_load(strided, 2, True, 2)
    top_k = problem["topk_ids"].shape[1]
    routing = align(problem["topk_ids"], contiguous.shape[0], SMALL.BLOCK_M)
    options = dict(top_k=top_k, activation=activation, layout="gpt_oss", gated=True, alpha=1.702, limit=7.0)
    results = []
    for weight in (contiguous, strided):
        h = gate_up.gate_up(problem["x"], weight, problem["b_gate_up"], routing.sorted_ids_padded,
                            routing.block_expert, config=SMALL, **options)
        d_preact, _ = backward_dh.backward_dh(
            problem["dy"], problem["x"], weight, problem["b_gate_up"], problem["w_down"], problem["b_down"],
            problem["topk_weights"].float(), h, routing.sorted_ids_padded, routing.block_expert, config=SMALL,
            **options)
        used = int(routing.num_padded)
        results.append((h[:used], d_preact[:used]))
    assert torch.equal(results[0][0], results[1][0]), "h"
    assert torch.equal(results[0][1], results[1][1]), "d_preact"
