"""`make gpu-check` (tools/gpu_check.py) in CI, where there is no GPU: the dry run end to end,
a forced GPU run refused clearly, and the verdicts on outputs that must fail."""
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from support import ROOT  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402
from gpu_check_report import bench_verdict, parse_junit, pytest_verdict  # noqa: E402

STEP_FILES = [f"{step}.json" for step in gpu_check.STEPS] + ["summary.json", "summary.md"]


def run_gpu_check(out_dir, mode, timeout_s, *extra):
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(out_dir), "--mode", mode, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    verdict_lines = [line for line in done.stdout.splitlines() if line.split()[:1] == ["gpu-check"]]
    return done, verdict_lines


def load(out_dir, name):
    with open(os.path.join(out_dir, name)) as handle:
        return json.load(handle)


@pytest.mark.slow
def test_make_gpu_check_runs_dry_without_a_gpu_and_writes_every_step(tmp_path):
    """`make gpu-check` as a user types it (mode auto: dry here), with the archive option."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check would run the GPU steps, not the dry ones")
    archive = tmp_path.parent / f"{tmp_path.name}.tar.gz"
    done = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}",
                           f"GPU_CHECK_OUT={tmp_path}", f"GPU_CHECK_ARCHIVE={archive}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    verdict_lines = [line for line in done.stdout.splitlines() if line.split()[:1] == ["gpu-check"]]
    assert done.returncode == 0, done.stdout + done.stderr
    for name in STEP_FILES:
        assert (tmp_path / name).is_file(), name
    assert [line.split()[1] for line in verdict_lines] == list(gpu_check.STEPS), done.stdout
    assert all(line.split()[2] in ("PASS", "SKIP") for line in verdict_lines), done.stdout
    summary = load(tmp_path, "summary.json")
    assert summary["mode"] == "dry" and summary["ok"]
    assert [step["step"] for step in summary["steps"]] == list(gpu_check.STEPS)

    build = load(tmp_path, "build.json")
    assert "CPU" in build["details"]["kernels"]["route"], build
    tests = load(tmp_path, "tests.json")["details"]
    gpu_file = tests["files"]["tests/ops/test_gpu.py"]
    assert gpu_file["passed"] == 0 and gpu_file["skipped"] > 0, gpu_file
    assert all("CUDA" in reason for reason in gpu_file["skip_reasons"]), gpu_file
    for name in gpu_check.TEST_FILES[1:]:  # the interpreter cases really ran
        assert tests["files"][name]["passed"] > 0 and tests["files"][name]["failed"] == 0, (name, tests["files"][name])

    bench = load(tmp_path, "bench.json")["details"]
    assert bench["mode"] == "dry" and bench["complete"] and not bench["disagreements"]
    assert set(bench["presets"]) == {"qwen3-30b-a3b", "gpt-oss-20b", "mixtral-8x7b"}
    rows = bench["rows"]
    assert rows and all(row["dry"] and row["ms"] is None for row in rows)  # no timing claims
    impls = {row["impl"] for row in rows}
    assert {"tpmoe", "grouped_mm", "dense"} <= impls
    assert {row["pass_"] for row in rows} == {"fwd", "fwd+bwd"}
    assert all(row["max_rel_err"] is not None for row in rows if row["impl"] == "tpmoe")
    assert len(bench["configs"]) == 3 * 2 and "gate_up" in bench["configs"][0]
    markdown = (tmp_path / "summary.md").read_text()
    assert "(dry)" in markdown and all(f"| {step} |" in markdown for step in gpu_check.STEPS)
    with tarfile.open(archive) as packed:  # the one file a lent machine sends back
        names = set(packed.getnames())
        assert {f"{tmp_path.name}/{name}" for name in STEP_FILES} <= names, names
        assert f"{tmp_path.name}/logs/tests.xml" in names, names
        assert packed.extractfile(f"{tmp_path.name}/summary.md").read().decode() == markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --mode gpu would run")
def test_forced_gpu_mode_without_a_gpu_fails_and_says_why(tmp_path):
    done, verdict_lines = run_gpu_check(tmp_path, "gpu", timeout_s=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert [line.split()[2] for line in verdict_lines] == ["FAIL", "SKIP", "SKIP", "SKIP"], done.stdout
    assert "no CUDA GPU" in load(tmp_path, "env.json")["reason"]
    assert not load(tmp_path, "summary.json")["ok"]


def test_an_archive_that_is_not_a_tarball_is_refused(tmp_path):
    done, _ = run_gpu_check(tmp_path, "dry", 60, "--archive", str(tmp_path / "evidence.zip"))
    assert done.returncode == 2 and "--archive" in done.stderr and "evidence.zip" in done.stderr, done.stderr
    assert not (tmp_path / "summary.json").exists()


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_a" time="0.1"/>
<testcase classname="tests.test_gpu" name="test_b" time="0.1">
<failure message="AssertionError: ids differ">x</failure></testcase>
<testcase classname="tests.test_other" name="test_c" time="0.1"><skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>"""


def test_a_failing_test_fails_the_step(tmp_path):
    path = tmp_path / "tests.xml"
    path.write_text(JUNIT)
    results = parse_junit(str(path))
    assert results["counts"] == dict(passed=1, failed=1, skipped=1)
    assert results["files"]["tests/test_other.py"]["skip_reasons"] == {"needs a CUDA GPU": 1}
    verdict, reason = pytest_verdict(1, results, 100, "")
    assert verdict == "FAIL" and "test_b" in reason
    assert pytest_verdict(None, None, 100, "")[0] == "FAIL"  # timed out
    assert pytest_verdict(2, None, 100, "usage")[0] == "FAIL"  # no report
    all_skipped = dict(counts=dict(passed=0, failed=0, skipped=1), failures=[],
                       files={"tests/ops/test_gpu.py": dict(passed=0, failed=0, skipped=1, skip_reasons={"no GPU": 1})})
    assert pytest_verdict(0, all_skipped, 100, "")[0] == "SKIP"


def test_a_disagreeing_or_cut_short_bench_fails_the_step():
    payload = dict(rows=[dict(preset="qwen3-30b-a3b")], disagreements=["tpmoe fwd at qwen3-30b-a3b T=1: 0.5"],
                   complete=True, mode="dry", presets={"qwen3-30b-a3b": {}}, notes=[], scale=1.0)
    assert bench_verdict(1, payload, 100, "")[0] == "FAIL"
    assert bench_verdict(None, dict(payload, disagreements=[]), 100, "")[0] == "FAIL"  # timed out
    assert bench_verdict(0, dict(payload, disagreements=[], complete=False), 100, "")[0] == "FAIL"
    assert bench_verdict(0, dict(payload, disagreements=[]), 100, "")[0] == "PASS"


def test_step_caps_keep_the_gpu_run_within_its_budget():
    """Even where every step runs to its cap, the GPU run ends inside its budget (under 8 minutes)."""
    assert gpu_check.BUDGET_S["gpu"] < 8 * 60
    elapsed = 0.0
    for step in gpu_check.STEPS:
        timeout = gpu_check.step_timeout(step, "gpu", time.monotonic() - elapsed)
        assert timeout >= gpu_check.SHORTEST_USEFUL_S, (step, timeout)
        elapsed += timeout
    assert elapsed <= gpu_check.BUDGET_S["gpu"] + 1
