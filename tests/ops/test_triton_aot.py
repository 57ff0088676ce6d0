"""Ahead-of-time compilation of every Triton kernel with every config for sm_80 and sm_90 (each
target's own tables: tile_configs), on CPU.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` (see
tpmoe/triton/aot.py, which specialises the arguments exactly as a launch would). This catches
what the interpreter forgives (dot shapes, layouts, shared memory over the limit), checks that
the bf16 GEMMs use wgmma on sm_90, and reads registers and spills from Triton's bundled
ptxas-blackwell, for the bias-free and the biased call sites, at I_p = 768 and at the uneven
shards 154 and 77 (I = 768 over 5 and 10 ranks), where the aligned weight storage and buffers
must keep the async copies; nothing may spill on either target. The compiles run in separate
processes, in parallel, because the kernels must be decorated without TRITON_INTERPRET (which
this test session sets for the others). The fp8 x fp8 variant on sm_90 (its own two compiles): an
e4m3 wgmma, no spills. Also here: the bytes-moved model (`python -m tpmoe.triton.aot --model`) and its invariants.
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

from support import ROOT  # noqa: E402
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
NUM_PROCESSES = 2
UNEVEN = (154, 77)  # I_p of I = 768 over 5 and 10 ranks: rows of 308 and 154 bytes in bf16
# Elementwise launches (no dot, no shared-memory pipeline): compiled and checked for spills,
# exempt from the GEMM checks (wgmma, shared memory, async copies).
ELEMENTWISE = ("combine", "split_sum")
# Quantized weights: the AOT tool's arguments for each format, and the variant it names.
QUANTIZED_FORMATS = {"fp8_block": ["--format", "fp8_block"],
                     "mxfp4": ["--format", "mxfp4", "--layout", "interleaved", "--activation", "clamped_swiglu"]}
QUANTIZED_VARIANTS = {"fp8_block": "fp8", "mxfp4": "mxfp4"}


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
        # Every config of every call site, bias-free and biased, on sm_90 (wgmma, registers,
        # spills), in two halves.
        ["--cc", "90", "--shard", "0/2"], ["--cc", "90", "--shard", "1/2"],
        # Every config of sm_80's tables, every call site bias-free and biased, at I_p = 768 and
        # the uneven shards (where the masks keep the most registers live), in two halves.
        ["--cc", "80", "--intermediate", "768", *map(str, UNEVEN), "--shard", "0/2"],
        ["--cc", "80", "--intermediate", "768", *map(str, UNEVEN), "--shard", "1/2"],
        # Main configs on sm_90 for the transposed weight layout (both bias variants: GPT-OSS is
        # biased) and the non-gated variant (other strides and branches), and fp32 inputs (exact
        # dots on FMA units: other register needs).
        ["--cc", "90", "--main-only", "--layout", "gpt_oss"],
        ["--cc", "90", "--main-only", "--bias", "none", "--not-gated", "--activation", "gelu",
         "--kernel", "gate_up", "backward_dh"],
        # The epilogue with the most live values (two softcaps, a sigmoid, their derivatives).
        ["--cc", "90", "--main-only", "--bias", "none", "--activation", "softcapped_swiglu",
         "--kernel", "gate_up", "backward_dh"],
        ["--cc", "90", "--main-only", "--dtype", "float32"],
        # Uneven shards: a rank's I_p of I = 768 over 5 and 10 ranks, both layouts.
        ["--cc", "90", "--main-only", "--intermediate", *map(str, UNEVEN)],
        ["--cc", "90", "--main-only", "--layout", "gpt_oss", "--intermediate", *map(str, UNEVEN)],
        # The forward kernels on quantized weights, dequantized in the B-load (tpmoe.triton.dequant):
        # every config (tile_configs.quantized_config) on both targets, bias-free and biased, at
        # I_p = 768 and at an uneven shard starting inside a scale block. MXFP4 as GPT-OSS runs it.
        *[["--cc", "80", "90", *QUANTIZED_FORMATS[name], "--intermediate", "768", str(UNEVEN[1]), "--shard", shard]
          for name in QUANTIZED_FORMATS for shard in ("0/2", "1/2")],
    ]
    rows = _run_aot(jobs)
    from tpmoe.triton.aot import TABLE_HEADER, format_row
    print("\n" + TABLE_HEADER)
    for row in rows:
        print(format_row(row))
    return rows


def test_every_kernel_and_config_compiles_for_sm80_and_sm90(aot_rows):
    from tpmoe.triton import tile_configs
    compiled = {(row["kernel"], row["cc"], row["BLOCK_M"], row["BLOCK_N"], row["BLOCK_K"], row["num_warps"],
                 row["num_stages"]) for row in aot_rows}
    for kernel in tile_configs.KERNELS:
        for capability in (80, 90):
            for config in tile_configs.all_configs(kernel, capability):  # each target's own tables
                key = (kernel, capability, config.BLOCK_M, config.BLOCK_N, config.BLOCK_K, config.num_warps,
                       config.num_stages)
                assert key in compiled, f"not compiled: {key}"


def test_shared_memory_within_each_target_limit(aot_rows):
    for row in aot_rows:
        assert (0 if row["kernel"] in ELEMENTWISE else 1) <= row["shared"] <= SHARED_MEMORY_LIMIT[row["cc"]], row


def test_every_launch_is_compiled(aot_rows):
    """The AOT table covers each kernel a forward or backward launches: the GEMMs, the combine
    (half-precision pair rows and fp32 split partials) and backward_dw's split sum."""
    compiled = {(row["kernel"], row["variant"], row["cc"]) for row in aot_rows}
    for kernel, variant in (("combine", "pairs"), ("combine", "split"), ("split_sum", "dW_gate_up+bias")):
        assert (kernel, variant, 90) in compiled, (kernel, variant)
    for kernel, variant in (("combine", "pairs"), ("combine", "split"), ("split_sum", "dW_gate_up+bias")):
        assert (kernel, variant, 80) in compiled, (kernel, variant)


def test_sm90_bf16_gemms_use_wgmma(aot_rows):
    """wgmma needs a 64-row tile per warpgroup: every sm_90 bf16 GEMM whose M tile is >= 64 must use it."""
    checked = 0
    for row in aot_rows:
        if row["cc"] != 90 or row["dtype"] != "bfloat16" or row["kernel"] in ELEMENTWISE:
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


def test_no_register_spills_on_sm80(aot_rows):
    """sm_80 (no wgmma: the fp32 accumulators of mma.sync sit in registers) takes its own configs
    where sm_90's spill there (tile_configs); every config of its tables compiles without a spill,
    at every call site, bias-free and biased, at I_p = 768 and the uneven shards."""
    from tpmoe.triton import tile_configs
    rows = [row for row in aot_rows if row["cc"] == 80]
    assert rows and all("registers" in row for row in rows)
    assert {row["intermediate"] for row in rows} == {768, *UNEVEN}
    variants = {(row["kernel"], row["variant"]) for row in rows}
    for kernel, variant in (("backward_dh", "dh"), ("backward_dh", "dh+bias"), ("backward_dw", "dW_down+bias"),
                            ("gate_up", "forward+bias"), ("down", "dx")):
        assert (kernel, variant) in variants, (kernel, variant)
    prefill_dh = tile_configs.kernel_config("backward_dh", 1024, 768, 2048, capability=80)
    assert any(row["kernel"] == "backward_dh" and row["BLOCK_M"] == 128 and row["BLOCK_N"] == prefill_dh.BLOCK_N
               for row in rows)
    spilling = [(row["kernel"], row["variant"], row["intermediate"],
                 f"{row['BLOCK_M']}x{row['BLOCK_N']}x{row['BLOCK_K']} w{row['num_warps']} s{row['num_stages']}",
                 row["spill_stores"], row["spill_loads"]) for row in rows if row["spill_stores"] or row["spill_loads"]]
    assert not spilling, f"configs that spill on sm_80: {spilling}"


def test_bias_free_and_biased_call_sites_compile(aot_rows):
    """Both variants of every call site (dx has no bias), every config on sm_90, both layouts."""
    from tpmoe.triton import tile_configs
    expected = {"gate_up": ("forward",), "down": ("forward", "dx"), "backward_dh": ("dh",),
                "backward_dw": ("dW_gate_up", "dW_down")}
    compiled = {(row["kernel"], row["variant"], row["layout"], row["BLOCK_M"], row["BLOCK_N"], row["BLOCK_K"],
                 row["num_warps"], row["num_stages"]) for row in aot_rows if row["cc"] == 90
                and row["dtype"] == "bfloat16"}
    for kernel, call_sites in expected.items():
        for config in tile_configs.all_configs(kernel, 90):
            for call_site in call_sites:
                for variant in (call_site,) if call_site == "dx" else (call_site, call_site + "+bias"):
                    key = (kernel, variant, "concatenated", config.BLOCK_M, config.BLOCK_N, config.BLOCK_K,
                           config.num_warps, config.num_stages)
                    assert key in compiled, f"not compiled: {key}"
        layouts = {row["layout"] for row in aot_rows if row["kernel"] == kernel and row["variant"].endswith("+bias")}
        assert {"concatenated", "gpt_oss"} <= layouts, (kernel, layouts)


def test_uneven_shards_keep_async_copies_and_do_not_spill(aot_rows):
    """At I_p = 154 and 77 (aligned weight rows and h / d_preact buffers) every sm_90 and sm_80 launch
    compiles without spills and with as many 16-byte async copies (cp.async or TMA) as at I_p = 768."""
    def key(row):
        return (row["kernel"], row["variant"], row["layout"], row["cc"], row["BLOCK_M"], row["BLOCK_N"],
                row["BLOCK_K"], row["num_warps"], row["num_stages"])

    # Against the same target's I_p = 768 row (sm_80's too: its job compiles every I_p).
    full = {key(row): row for row in aot_rows if row["dtype"] == "bfloat16" and row["intermediate"] == 768}
    # Quantized weights are stored as their shard functions make them, compact (an fp8 row of 77
    # bytes is not 16-byte aligned): their figures are test_quantized_forward_kernels_compile_without_spills's.
    uneven = [row for row in aot_rows if row["intermediate"] in UNEVEN and row["kernel"] not in ELEMENTWISE
              and row["variant"].split("+")[0] not in QUANTIZED_VARIANTS.values()]
    assert {row["intermediate"] for row in uneven} == set(UNEVEN)
    assert {"concatenated", "gpt_oss"} <= {row["layout"] for row in uneven}
    problems = []
    for row in uneven:
        # Full-width (16-byte) async copies or TMA: 4-byte copies do not count as kept.
        copies = row["cp_async_16"] + row["tma"]
        reference = full.get(key(row))
        expected = reference["cp_async_16"] + reference["tma"] if reference else 1
        if row["spill_stores"] or row["spill_loads"]:
            problems.append(f"{key(row)} I_p={row['intermediate']}: spills {row['spill_stores']} bytes")
        if copies == 0 or copies < expected:
            problems.append(f"{key(row)} I_p={row['intermediate']}: {copies} 16-byte async copies (I_p=768: "
                            f"{expected}; {row['cp_async']} of any width), {row['ld_global']} plain global loads")
    assert not problems, "uneven shards:\n" + "\n".join(problems)


def test_quantized_forward_kernels_compile_without_spills(aot_rows):
    """gate_up and down with fp8_block and mxfp4 weights dequantized in their B-load: every
    quantized config of each target's tables compiles on sm_80 and sm_90, bias-free and biased,
    at I_p = 768 and 77 (a shard starting inside a scale block), without a spill, within shared
    memory, and with wgmma for sm_90's 64-row tiles."""
    from tpmoe.triton import tile_configs
    rows = [row for row in aot_rows if row["variant"].split("+")[0] in QUANTIZED_VARIANTS.values()]
    compiled = {(row["kernel"], row["variant"], row["cc"], row["intermediate"], row["BLOCK_M"], row["BLOCK_N"],
                 row["BLOCK_K"], row["num_warps"]) for row in rows}
    for weight_format, variant in QUANTIZED_VARIANTS.items():
        for kernel in ("gate_up", "down"):
            for capability in (80, 90):
                for base in tile_configs.all_configs(kernel, capability):
                    config = tile_configs.quantized_config(kernel, base)
                    for name in (variant, variant + "+bias"):
                        for intermediate in (768, UNEVEN[1]):
                            key = (kernel, name, capability, intermediate, config.BLOCK_M, config.BLOCK_N,
                                   config.BLOCK_K, config.num_warps)
                            assert key in compiled, f"not compiled: {key}"
    spilling = [(row["kernel"], row["variant"], row["cc"], row["intermediate"],
                 f"{row['BLOCK_M']}x{row['BLOCK_N']}x{row['BLOCK_K']}", row["spill_stores"], row["spill_loads"])
                for row in rows if row["spill_stores"] or row["spill_loads"]]
    assert not spilling, f"quantized launches that spill: {spilling}"
    for row in rows:
        assert 1 <= row["shared"] <= SHARED_MEMORY_LIMIT[row["cc"]], row
        if row["cc"] == 90 and row["BLOCK_M"] >= 64:
            assert row["wgmma"] > 0, row


@pytest.fixture(scope="module")
def fp8_activation_rows():
    if not os.path.exists(PTXAS):
        pytest.skip(f"Triton's bundled ptxas-blackwell is missing at {PTXAS}")
    # Two compiles: gate_up and down at their prefill config, bias-free.
    return _run_aot([["--cc", "90", "--format", "fp8_block", "--fp8-activations", "--bias", "none"]])


def test_sm90_fp8_activation_variant_uses_an_fp8_wgmma_without_spills(fp8_activation_rows):
    """The fp8 x fp8 variant (ACT_FP8, tpmoe.triton.dequant.fp8_activation_dot) on sm_90, gate_up
    and down at the prefill config of tile_configs.fp8_activation_config: its dots are wgmma with
    e4m3 operands and float32 accumulators (k = 32 a step), nothing spills, shared memory fits."""
    from tpmoe.triton import tile_configs
    rows = fp8_activation_rows
    assert sorted(row["kernel"] for row in rows) == ["down", "gate_up"]
    for row in rows:
        assert row["variant"] == "fp8xfp8" and row["cc"] == 90 and row["BLOCK_M"] == 128, row
        assert row["BLOCK_K"] == 128 and row["SPLIT"] == 1, row  # k-steps of one scale block (B = 128)
        assert row["wgmma_e4m3"] > 0 and row["wgmma_e4m3"] == row["wgmma"], row
        assert all(shape.endswith("k32") for shape in row["wgmma_shapes"]), row
        assert not row["spill_stores"] and not row["spill_loads"], row
        assert 1 <= row["shared"] <= SHARED_MEMORY_LIMIT[90], row
    gate_up = next(row for row in rows if row["kernel"] == "gate_up")
    assert gate_up["BLOCK_N"] == tile_configs.FP8_ACTIVATION_GATE_UP_BLOCK_N


def _run_model(*arguments):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "model.json")
        result = subprocess.run([sys.executable, "-m", "tpmoe.triton.aot", "--model", "--json", out, *arguments],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        with open(out) as handle:
            return result.stdout, json.load(handle)


def test_bytes_moved_model_obeys_its_invariants():
    """Every launch moves at least the ideal bytes (each operand once); the row-fastest order
    reads at least what a GROUP_M swizzle does (and moves at least as much, where no split adds
    partials); a decode forward reads at least the touched
    experts' weights; and at T = 16384 the row-fastest down kernel re-reads h once per column
    block (H / BLOCK_N times), which the swizzle brings back to once."""
    from tpmoe.presets import get_preset
    from tpmoe.triton import tile_configs
    output, rows = _run_model("--preset", "qwen3-30b-a3b", "mixtral-8x7b", "--tokens", "1", "16384", "--group-m", "8")
    assert "row-fastest (old)" in output and "as configured" in output
    assert {(row["preset"], row["tokens"]) for row in rows} == {(p, t) for p in ("qwen3-30b-a3b", "mixtral-8x7b")
                                                              for t in (1, 16384)}
    forward = {}
    for row in rows:
        for order in ("old", "configured"):
            assert row[order]["total"] >= row["ideal"] * (1 - 1e-9), row
        old, now = row["old"], row["configured"]
        # "old" is GROUP_M = 1 and SPLIT = 1. The swizzle never adds reads; a split (the decode
        # tables') adds only its fp32 partials, written by the GEMM and read by the combine.
        if row["config"] is None:  # combine / dx_combine
            assert now["c_written"] == old["c_written"], row
        else:
            assert old["a_read"] + old["b_read"] >= (now["a_read"] + now["b_read"]) * (1 - 1e-9), row
            if row["config"]["SPLIT"] == 1:
                assert old["total"] >= now["total"] * (1 - 1e-9), row
        if row["launch"] in ("gate_up", "down", "combine"):
            forward.setdefault((row["preset"], row["tokens"]), []).append(row)
    for (preset, tokens), launches in forward.items():
        if tokens == 1:
            assert sum(row["configured"]["total"] for row in launches) >= launches[0]["weight_floor"]
    config = get_preset("qwen3-30b-a3b").config
    down = next(row for row in rows if row["preset"] == "qwen3-30b-a3b" and row["tokens"] == 16384
                and row["launch"] == "down")
    h_bytes = 16384 * config.top_k * config.intermediate_size * 2
    block_n = tile_configs.launch_configs(16384, config.top_k, config.num_experts, config.hidden_size,
                                          config.intermediate_size, 2 * config.intermediate_size)["down"].BLOCK_N
    assert down["old"]["a_read"] == pytest.approx(h_bytes * config.hidden_size / block_n)
    assert down["configured"]["a_read"] == pytest.approx(h_bytes)
