"""Ahead-of-time compilation of every Triton kernel with every config for sm_80 and sm_90, on CPU.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` (see
tpmoe/triton/aot.py, which specialises the arguments exactly as a launch would). This catches
what the interpreter forgives (dot shapes, layouts, shared memory over the limit), checks that
the bf16 GEMMs use wgmma on sm_90, and reads registers and spills from Triton's bundled
ptxas-blackwell. The compiles run in separate processes, in parallel, because the kernels
must be decorated without TRITON_INTERPRET (which this test session sets for the others).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton", reason="the Triton path needs the triton package (pip install tpmoe[triton])")
pytestmark = [pytest.mark.triton, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
NUM_PROCESSES = 2


def _run_aot(jobs):
    """jobs: lists of CLI arguments for `python -m tpmoe.triton.aot`, run NUM_PROCESSES at a time;
    returns all their rows."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    folder = tempfile.mkdtemp(prefix="tpmoe_aot_")
    try:
        pending = list(enumerate(jobs))
        running, outputs = [], []
        while pending or running:
            while pending and len(running) < NUM_PROCESSES:
                index, arguments = pending.pop(0)
                out = os.path.join(folder, f"rows{index}.json")
                command = [sys.executable, "-m", "tpmoe.triton.aot", "--json", out, *arguments]
                running.append((out, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True)))
                outputs.append(out)
            out, process = running.pop(0)
            log, _ = process.communicate(timeout=900)
            assert process.returncode == 0, f"AOT compile failed:\n{log[-6000:]}"
        rows = []
        for out in outputs:
            with open(out) as handle:
                rows += json.load(handle)
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def aot_rows():
    if not os.path.exists(PTXAS):
        pytest.skip(f"Triton's bundled ptxas-blackwell is missing at {PTXAS}")
    jobs = [
        # Every config of every call site on sm_90 (wgmma, registers, spills), in two halves.
        ["--cc", "90", "--shard", "0/2"], ["--cc", "90", "--shard", "1/2"],
        # Every config of every kernel on sm_80 (one call site each: the kernel code is the same).
        ["--cc", "80", "--one-variant"],
        # Main configs on sm_90 for the transposed weight layout and the non-gated variant (other
        # strides and branches), and fp32 inputs (exact dots on FMA units: other register needs).
        ["--cc", "90", "--main-only", "--layout", "gpt_oss"],
        ["--cc", "90", "--main-only", "--not-gated", "--activation", "gelu", "--kernel", "gate_up", "backward_dh"],
        # The epilogue with the most live values (two softcaps, a sigmoid, their derivatives).
        ["--cc", "90", "--main-only", "--activation", "softcapped_swiglu", "--kernel", "gate_up", "backward_dh"],
        ["--cc", "90", "--main-only", "--dtype", "float32"],
    ]
    rows = _run_aot(jobs)
    from tpmoe.triton.aot import TABLE_HEADER, format_row
    print("\n" + TABLE_HEADER.replace("variant    ", "variant     layout       dtype    "))
    for row in rows:
        line = format_row(row)
        print(line[:25] + f"{row['layout']:13}{row['dtype']:9}" + line[25:])
    return rows


def test_every_kernel_and_config_compiles_for_sm80_and_sm90(aot_rows):
    from tpmoe.triton import tile_configs
    compiled = {(row["kernel"], row["cc"], row["BLOCK_M"], row["BLOCK_N"], row["BLOCK_K"], row["num_warps"],
                 row["num_stages"]) for row in aot_rows}
    for kernel in tile_configs.KERNELS:
        for config in tile_configs.all_configs(kernel):
            for capability in (80, 90):
                key = (kernel, capability, config.BLOCK_M, config.BLOCK_N, config.BLOCK_K, config.num_warps,
                       config.num_stages)
                assert key in compiled, f"not compiled: {key}"


def test_shared_memory_within_each_target_limit(aot_rows):
    for row in aot_rows:
        assert 0 < row["shared"] <= SHARED_MEMORY_LIMIT[row["cc"]], row


def test_sm90_bf16_gemms_use_wgmma(aot_rows):
    """wgmma needs a 64-row tile per warpgroup: every sm_90 bf16 GEMM whose M tile is >= 64 must use it."""
    checked = 0
    for row in aot_rows:
        if row["cc"] != 90 or row["dtype"] != "bfloat16":
            continue
        tile_m = row["BLOCK_N"] if row["kernel"] == "backward_dw" else row["BLOCK_M"]  # dW tile is [BLOCK_N, BLOCK_K]
        if tile_m >= 64:
            assert row["wgmma"] > 0, row
            checked += 1
        else:
            assert row["wgmma"] > 0 or row["mma"] > 0, row  # decode-sized tiles: mma.sync
    assert checked >= 10


def test_no_register_spills_on_sm90(aot_rows):
    rows = [row for row in aot_rows if row["cc"] == 90]
    assert {row["dtype"] for row in rows} == {"bfloat16", "float32"}
    assert rows and all("registers" in row for row in rows)
    spilling = [row for row in rows if row["spill_stores"] or row["spill_loads"]]
    assert not spilling, f"configs that spill: {spilling}"
