"""The `tpmoe` command, run as users run it (`python -m tpmoe ...` in a subprocess), on the tiny
preset: verify at world size 2 (real gloo ranks) passes and prints its table; verify FAILS when
a fault is injected (the last rank's w_down shard scaled by 1 + 1e-3 after the block is built:
the failure must come from the comparison with the reference, the collectives still pass);
bench writes JSON rows with the documented fields and a PNG; usage errors are one line on
stderr with exit status 2, never a traceback. Plus in-process checks of the pieces (token
parsing, the bench's transformers blocks against the float64 reference).
"""
import argparse
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from support import ROOT  # noqa: E402
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _env():
    # One thread per process: the machine's cores are shared by every rank (and other jobs).
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))


def _start(*args):
    return subprocess.Popen([sys.executable, "-m", "tpmoe", *args], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(process, timeout=240):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def _run(*args, timeout=240):
    return _finish(_start(*args), timeout)


def _table_row(stdout, first_cell):
    rows = [line for line in stdout.splitlines() if line.startswith(first_cell)]
    assert rows, f"no table row starting with {first_cell!r} in:\n{stdout}"
    return rows[0]


@pytest.mark.distributed
def test_verify_world_size_2_passes_and_a_fault_fails():
    # Both runs at once: each spends most of its time starting Python processes.
    passing = _start("verify", "--preset", "tiny", "--world-size", "2")
    faulty = _start("verify", "--preset", "tiny", "--world-size", "2", "--mode", "sp", "--inject-fault",
                    "perturb-shard")
    code, stdout, stderr = _finish(passing)
    assert code == 0, stdout + stderr
    assert re.search(r"world size 2 \(spawn, (gloo|nccl)\), mode tp", stdout), stdout
    for check in ("output", "input grad", "router_weight grad", "shared_gate grad",
                  "w_gate_up grad (each rank's shard)", "w_down grad (each rank's shard)",
                  "shared_gate_up grad (each rank's shard)", "shared_down grad (each rank's shard)"):
        row = _table_row(stdout, check)
        assert row.endswith("pass") and "1.0e-05" in row, row
    assert _table_row(stdout, "forward per block").split()[3:] == ["all_reduce", "x1", "all_reduce", "x1",
                                                                   "(every", "rank)", "pass"]
    assert _table_row(stdout, "backward per block").endswith("pass")
    assert stdout.rstrip().endswith("verify PASSED")

    code, stdout, stderr = _finish(faulty)
    assert code == 1, stdout + stderr
    assert "INJECTED FAULT: perturb-shard" in stdout and "mode sp" in stdout
    # The perturbed weight changes the output and the gradients flowing through it...
    for check in ("output", "input grad", "router_weight grad"):
        row = _table_row(stdout, check)
        assert row.endswith("FAIL"), row
        error = float(row.split()[-3])
        assert 1e-5 < error < 1e-2, row  # the size of the injected change, not garbage
    # ...while the collectives are as they should be: the failure is the comparison's.
    for phase in ("forward per block", "backward per block", "step (router grads)"):
        assert _table_row(stdout, phase).endswith("pass")
    assert stdout.rstrip().endswith("verify FAILED")
    assert "Traceback" not in stderr


@pytest.mark.distributed
def test_bench_writes_json_rows_and_plot(tmp_path):
    json_path, plot_path = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    args = ["bench", "--preset", "tiny", "--tokens", "1,5", "--world-size", "2", "--repeats", "2",
            "--json", str(json_path)]
    if HAS_MATPLOTLIB:
        args += ["--plot", str(plot_path)]
    code, stdout, stderr = _run(*args)
    assert code == 0, stdout + stderr
    payload = json.loads(json_path.read_text())
    rows = payload["rows"]
    fields = ("preset", "impl", "world_size", "tokens", "mode", "median_ms", "gflops", "fraction_of_limit",
              "min_ms", "max_ms", "q1_ms", "q3_ms", "samples", "flags")
    assert tuple(payload["fields"]) == fields
    for row in rows:
        assert set(fields) <= set(row), row
        assert row["preset"] == "tiny" and row["mode"] == "fwd" and row["median_ms"] > 0 and row["gflops"] > 0
        assert 0 < row["min_ms"] <= row["q1_ms"] <= row["median_ms"] <= row["q3_ms"] <= row["max_ms"], row
        assert row["samples"] == 2 and set(row["flags"]) <= {"wide", "beats_ceiling", "beats_floor"}
        if row["impl"] in ("dense", "floor"):
            assert row["fraction_of_limit"] is None
        else:
            assert 0 < row["fraction_of_limit"]
    measured = {(row["impl"], row["world_size"], row["tokens"]) for row in rows}
    expected = {(impl, p, t) for impl in ("tpmoe", "dense", "floor") for p in (1, 2) for t in (1, 5)}
    if HAS_TRANSFORMERS:
        expected |= {(impl, 1, t) for impl in ("hf_eager", "hf_grouped_mm") for t in (1, 5)}
    assert expected <= measured, expected - measured
    assert f"JSON: {json_path}" in stdout
    table = stdout.split("diff vs tpmoe")[1]
    assert "tpmoe" in table and "dense" in table and "floor" in table
    assert "min ms" in stdout and "max ms" in stdout and "flag" in stdout
    # The last line advises a rerun exactly when some row is flagged (a tiny block on a shared machine may be).
    assert stdout.rstrip().splitlines()[-1].startswith("unstable: ") == any(row["flags"] for row in rows)
    if HAS_MATPLOTLIB:
        assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot_path.stat().st_size > 1000
        assert f"plot: {plot_path}" in stdout


def test_plot_without_matplotlib_says_so_before_running(tmp_path, monkeypatch, capsys):
    from tpmoe.cli import main
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra sees
    assert main(["bench", "--preset", "tiny", "--tokens", "1", "--world-size", "1",
                 "--plot", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("tpmoe: error: --plot: needs matplotlib, which is not installed "
                                    "(pip install 'tpmoe[plot]' or pip install matplotlib)")
    assert not (tmp_path / "x.png").exists() and captured.out == ""


def test_progress_without_tqdm_prints_lines(monkeypatch, capsys):
    from tpmoe.cli.bench import _Progress
    monkeypatch.setitem(sys.modules, "tqdm", None)
    progress = _Progress(2)
    progress(("progress", "tpmoe T=1 P=1"))
    progress(("note", "hf_grouped_mm: skipped (no kernel)"))
    progress.close()
    assert capsys.readouterr().err.splitlines() == ["[1/2] tpmoe T=1 P=1", "note: hf_grouped_mm: skipped (no kernel)"]


def test_verify_in_process_bfloat16_and_fault(capsys):
    """World size 1 (no process group): bf16 against twice the same-dtype reference's error, and
    the injected fault caught by the comparison (exit 1)."""
    from tpmoe.cli import main
    assert main(["verify", "--world-size", "1", "--dtype", "bfloat16", "--tokens", "11"]) == 0
    stdout = capsys.readouterr().out
    assert "world size 1 (in-process, no process group)" in stdout and "bfloat16" in stdout
    assert "tolerance 2 x the same-dtype reference's error" in stdout and stdout.rstrip().endswith("verify PASSED")
    assert main(["verify", "--world-size", "1", "--tokens", "11", "--inject-fault", "perturb-shard"]) == 1
    stdout = capsys.readouterr().out
    assert _table_row(stdout, "output").endswith("FAIL") and stdout.rstrip().endswith("verify FAILED")


@pytest.mark.distributed
def test_verify_expert_parallel_passes():
    """--ep: EP 2 x TP 2 on 4 ranks and EP 3 (tiny's 8 experts: ranges 3, 3, 2) on 3, at once."""
    ep_tp = _start("verify", "--preset", "tiny", "--ep", "2", "--world-size", "4", "--tokens", "11")
    uneven = _start("verify", "--preset", "tiny", "--ep", "3", "--world-size", "3", "--tokens", "7")
    for process, mode, counts in ((ep_tp, "ep 2 x tp 2", "all_reduce x1, all_to_all_single x3"),
                                  (uneven, "ep 3 x tp 1", "all_to_all_single x3")):
        code, stdout, stderr = _finish(process)
        assert code == 0, stdout + stderr
        assert f"mode {mode}," in stdout, stdout
        assert _table_row(stdout, "forward per block").endswith("pass") and counts in stdout, stdout
        assert _table_row(stdout, "step (router grads)").endswith("pass"), stdout
        assert stdout.rstrip().endswith("verify PASSED")
    assert "experts per EP rank [3, 3, 2]" in stdout, stdout


# Run as processes: the exit status and stderr that a user sees.
BAD_COMMANDS = {
    "unknown preset": (["verify", "--preset", "mixtral-8x22b"], "preset: expected one of mixtral-8x7b"),
    "world size 0": (["verify", "--world-size", "0"], "--world-size: expected a positive integer, got 0"),
    "world size too large": (["bench", "--world-size", "100000"], "--world-size: expected at most"),
    "bad tokens": (["bench", "--tokens", "1,x,3"], "--tokens: expected a positive integer, got 'x'"),
}
# The same path in-process (cheaper than a process each).
BAD_ARGUMENTS = {
    "world size not a number": (["verify", "--world-size", "two"], "--world-size: expected a positive integer"),
    "zero tokens": (["bench", "--tokens", "0"], "--tokens: expected a positive integer, got 0"),
    "empty token list": (["bench", "--tokens", "1,,2"], "--tokens: expected a comma-separated list"),
    "bad verify tokens": (["verify", "--tokens", "1,2"], "--tokens: expected a positive integer, got '1,2'"),
    "bad scale": (["bench", "--scale", "2"], "--scale: expected a number in (0, 1]"),
    "bad mode": (["verify", "--mode", "pp"], "--mode: expected tp or sp, got 'pp'"),
    "bad impl": (["bench", "--impl", "tpmoe,vllm"], "--impl: expected a comma-separated subset of"),
    "bad dtype": (["bench", "--dtype", "int8"], "--dtype: expected one of float32, bfloat16, float16"),
    "bad device": (["bench", "--device", "tpu"], "--device: expected auto, cpu or cuda, got 'tpu'"),
    "unknown option": (["verify", "--wrld-size", "2"], "unrecognized arguments: --wrld-size 2"),
    "no command": ([], "expected a command: verify or bench"),
    "ep not dividing": (["verify", "--ep", "3", "--world-size", "4"],
                        "--world-size: expected a multiple of --ep 3 (EP x TP ranks), got 4"),
    "ep above the experts": (["verify", "--ep", "9", "--world-size", "9"], "--ep: expected at most 8"),
    "ep with sp": (["verify", "--ep", "2", "--mode", "sp"], "--mode: expected tp with --ep"),
    "bench ep not dividing": (["bench", "--ep", "2", "--world-size", "3"],
                              "--world-size: expected a multiple of --ep 2 (EP x TP ranks), got 3"),
    "bench ep above the experts": (["bench", "--ep", "9", "--world-size", "9"], "--ep: expected at most 8"),
    "bench ep with impl": (["bench", "--ep", "2", "--impl", "tpmoe"], "--impl: not used with --ep"),
}


def test_usage_errors_are_one_line_without_traceback():
    processes = {name: _start(*args) for name, (args, _) in BAD_COMMANDS.items()}
    for name, process in processes.items():
        code, stdout, stderr = _finish(process, timeout=120)
        expected = BAD_COMMANDS[name][1]
        assert code == 2, f"{name}: exit {code}\n{stdout}{stderr}"
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tpmoe: error: "), f"{name}: {stderr!r}"
        assert expected in lines[0], f"{name}: {lines[0]!r}"
        assert stdout == "", f"{name}: {stdout!r}"


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments_in_process(name, capsys):
    from tpmoe.cli import main
    args, expected = BAD_ARGUMENTS[name]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpmoe: error: ") and expected in lines[0], captured.err
    assert captured.out == ""


def test_world_size_above_the_intermediate_size():
    from tpmoe import MoEConfig
    from tpmoe.cli import UsageError, check_world_size
    config = MoEConfig(hidden_size=8, intermediate_size=2, num_experts=2, top_k=1)
    assert check_world_size(2, config, "cpu") == 2
    with pytest.raises(UsageError, match=r"--world-size: expected at most 2 \(the preset's intermediate size"):
        check_world_size(3, config, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: --backend triton runs there")
def test_triton_backend_without_cuda_is_a_usage_error(capsys, monkeypatch):
    from tpmoe.cli import main
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["verify", "--preset", "tiny", "--backend", "triton"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpmoe: error: --backend: triton runs on CUDA tensors"), captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: --device cuda is valid here")
def test_device_cuda_without_cuda(capsys):
    from tpmoe.cli import main
    assert main(["verify", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == \
        "tpmoe: error: --device: cuda requested, but torch sees no CUDA device here"


def test_list_presets():
    from tpmoe.cli import main
    from tpmoe.presets import PRESETS
    code, stdout, stderr = _run("--list-presets")
    assert code == 0, stderr
    assert [line.split()[0] for line in stdout.strip().splitlines()[1:]] == list(PRESETS)
    # One option, taken wherever it is on the line (as --help is), before any other check.
    for argv in (["bench", "--list-presets"], ["--list-presets", "verify"], ["verify", "--list-presets", "--mode", "sp"]):
        assert main(argv) == 0, argv


def test_parse_tokens():
    from tpmoe.cli import parse_tokens
    assert parse_tokens("512,1,32,32") == [1, 32, 512]
    assert parse_tokens(" 7 ") == [7]
    for bad in ("", "1,", "a", "-1", "1.5", "0,1"):
        # argparse puts the option's name in front ("--tokens: expected ...", BAD_ARGUMENTS).
        with pytest.raises(argparse.ArgumentTypeError, match="^expected a (positive integer|comma-separated list)"):
            parse_tokens(bad)


def test_an_error_inside_a_command_is_not_a_usage_error(monkeypatch):
    """parser.error is for what the user typed; a bug inside a command is a traceback, not
    'tpmoe: error: ...' with the usage exit status."""
    import tpmoe.cli.bench
    from tpmoe.cli import main

    def broken_run_bench(*args, **kwargs):
        raise ValueError("an internal check failed")
    monkeypatch.setattr(tpmoe.cli.bench, "run_bench", broken_run_bench)
    with pytest.raises(ValueError, match="an internal check failed"):
        main(["bench", "--world-size", "1", "--tokens", "1"])


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install 'tpmoe[hf]')")
@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "deepseek-v3", "gpt-oss-20b", "tiny"])
def test_bench_hf_block_shares_weights_and_matches_reference(preset, seed):
    """The transformers block the bench times computes tpmoe's block (float64, HF's float32
    router casts off) and holds the very same tensors (no copy)."""
    from support.hf_models import hf_router_float32_casts_disabled

    from tpmoe.cli.hf_blocks import make_hf_block
    from tpmoe.presets import get_preset, preset_config
    from tpmoe.reference import reference_moe_block
    from tpmoe.weights import random_moe_weights

    config = preset_config(preset, 1.0 if preset == "tiny" else 1 / 64)
    generator = torch.Generator().manual_seed(seed)
    weights = random_moe_weights(config, dtype=torch.float64, generator=generator)
    x = torch.randn(13, config.hidden_size, dtype=torch.float64, generator=generator)
    module, call = make_hf_block(get_preset(preset).family, config, weights, "eager", trainable=False)
    with hf_router_float32_casts_disabled():
        out = call(x)
    # DeepSeek-V3 routes in float32 (config.router_dtype); HF does too, but not with its casts off.
    reference = reference_moe_block(x, weights, dataclasses.replace(config, router_dtype=None))
    assert ((out - reference).abs().max() / reference.abs().max()).item() < 1e-12
    pointers = {tensor.data_ptr() for tensor in list(module.parameters()) + list(module.buffers())}
    assert weights["w_gate_up"].data_ptr() in pointers and weights["w_down"].data_ptr() in pointers
