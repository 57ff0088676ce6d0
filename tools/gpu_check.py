"""`make gpu-check`: one prepared command that runs what matters on a lent GPU and writes the
evidence (issue 14). It installs nothing: it uses the machine's own torch, triton, transformers.

Steps, each in a subprocess under its own time cap (a hang in one leaves the others' results),
within a total budget that ends a GPU run in under 8 minutes:
  env    python, torch, CUDA, triton, transformers, the GPU, the CUDA toolkit (gpu_check_probes.py env)
  build  the extension with its CUDA sources for sm_90 (TORCH_CUDA_ARCH_LIST=9.0 pip install
         --no-build-isolation --no-deps -e .), then `import tpmoe._C`: route must have a CUDA
         kernel (align on CUDA is Triton, tpmoe/triton/align.py) (gpu_check_probes.py ops)
  tests  the suite's CUDA-capable tests on the GPU: tests/ops/test_gpu.py, test_triton_fused.py,
         test_triton_kernels.py, test_routing_ops.py, test_experts_contract.py,
         test_triton_align.py, test_launch_count.py (pytest; xdist workers where installed)
  bench  benchmarks/bench_kernels.py --backward: Qwen3-30B-A3B, GPT-OSS-20B and Mixtral-8x7B expert
         shapes, bf16, T in {1, 16, 128, 1024, 8192}, against torch._grouped_mm, transformers'
         grouped_mm experts and a dense GEMM of the same FLOPs
Without CUDA (here, CI) the same steps run dry: env; build = `make build` (the CPU build, a no-op
when up to date) and the import check; tests = the same files, a few cases of each, under the
Triton interpreter (test_gpu.py's tests skip, and are reported as SKIP); bench = bench_kernels.py
--dry (tiny shapes, the interpreter, nothing timed).

Under --out (default benchmarks/out/gpu-check): env.json, build.json, tests.json, bench.json (each:
verdict, reason, seconds, command, the step's results), summary.json, summary.md, and logs/ (each
step's whole output, pytest's junit XML, the bench's raw JSON and tables). One verdict line per
step is printed (PASS / FAIL / SKIP and why); the exit code is 1 when a step failed. --archive
FILE.tar.gz packs the whole folder into one file as well (the lent machine sends back few files):

  make gpu-check GPU_CHECK_OUT=/tmp/gpu-check GPU_CHECK_ARCHIVE=$OUT/gpu-check.tar.gz
"""
import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_report import (bench_verdict, parse_junit, summary_markdown, tail,  # noqa: E402
                              pytest_verdict)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "build", "tests", "bench")
# Seconds: each step's cap, the whole run's budget, and what a step leaves for the ones after it
# (so that a slow build cannot starve the tests and the bench). GPU: the 8 minutes less a
# margin for the orchestration. Dry: a fresh CPU build alone takes minutes on 2 cores.
CAPS = {"gpu": dict(env=30, build=180, tests=180, bench=210), "dry": dict(env=60, build=900, tests=300, bench=300)}
BUDGET_S = {"gpu": 470, "dry": 1500}
RESERVE_S = {"gpu": dict(env=0, build=0, tests=90, bench=100), "dry": dict(env=0, build=0, tests=60, bench=60)}
SHORTEST_USEFUL_S = 20
TEST_FILES = ("tests/ops/test_gpu.py", "tests/ops/test_triton_fused.py", "tests/ops/test_triton_kernels.py",
              "tests/ops/test_routing_ops.py", "tests/ops/test_experts_contract.py", "tests/ops/test_triton_align.py",
              "tests/ops/test_launch_count.py")
# Dry: a few interpreter cases of each file, every layout once (and all of test_gpu.py, which skips).
DRY_SELECTION = ("test_gpu.py or (fp32_and_fp64 and (1-24-12-5-3 or 11-24-10-4-2-gpt_oss or 13-20-9-3-2)) "
                 "or (half_within_twice and 11-24-10-4-2-gpt_oss and bfloat16) or test_gate_up_kernel "
                 "or (backward_dw_kernel and gpt_oss) or (test_route_matches_twin and float32) "
                 "or (test_align_matches_twin and 16) or test_launches_per_path "
                 "or test_route_and_align_are_two_launches")
# The cap of one test under pytest-timeout, where installed: a hanging test fails alone.
TEST_TIMEOUT_S = 150


def step_timeout(step, mode, started):
    """The step's cap, cut so that the later steps keep their reserve within the budget."""
    later = STEPS[STEPS.index(step) + 1:]
    left = BUDGET_S[mode] - (time.monotonic() - started) - sum(RESERVE_S[mode][s] for s in later)
    return int(min(CAPS[mode][step], left))


def run_logged(command, log_path, timeout_s, env=None):
    """(exit code, or None when it ran past timeout_s and was killed with its children; seconds)."""
    begin = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # its own process group: killed whole
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    return code, round(time.monotonic() - begin, 1)


def probe_command(name, out_path):
    return [sys.executable, "tools/gpu_check_probes.py", name, "--json", out_path]


def run_probe(name, log_dir, timeout_s):
    """(the probe's JSON or None, its exit code or None, seconds); its chatter goes to the log."""
    out_path = os.path.join(log_dir, f"probe_{name}.json")
    if os.path.exists(out_path):
        os.remove(out_path)
    code, seconds = run_logged(probe_command(name, out_path), os.path.join(log_dir, f"probe_{name}.log"), timeout_s)
    if code != 0 or not os.path.exists(out_path):
        return None, code, seconds
    with open(out_path) as handle:
        result = json.load(handle)
    os.remove(out_path)  # it goes into the step's JSON; the device sends back few files
    return result, code, seconds


def env_step(ctx):
    info, code, seconds = run_probe("env", ctx["logs"], ctx["timeout"])
    record = dict(seconds=seconds, command=" ".join(probe_command("env", "JSON")), details=info)
    if info is None:
        reason = "timed out" if code is None else f"exit {code}"
        return dict(record, verdict="FAIL", reason=f"the probe failed ({reason}): {tail(ctx['logs'], 'probe_env')}")
    if ctx["requested"] == "gpu" and not info["cuda_available"]:
        return dict(record, verdict="FAIL", reason=f"--mode gpu, but torch {info['torch']} sees no CUDA GPU")
    versions = (f"torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
                f"transformers {info['transformers']}, python {info['python']}")
    if info["cuda_available"]:
        reason = f"{info['gpu']} (cc {info['compute_capability']}, {info['gpu_memory_gib']} GiB); {versions}"
    else:
        reason = f"dry: no CUDA GPU; {versions}"
    return dict(record, verdict="PASS", reason=reason)


def build_command(ctx):
    """(command, environment): the CUDA build for sm_90 on a GPU, `make build` dry."""
    env = dict(os.environ)
    if ctx["mode"] == "dry":
        return ["make", "--no-print-directory", "build", f"PYTHON={sys.executable}"], env
    info = ctx["env"]
    env.update(TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS=str(info.get("cpu_count") or 4))
    if info.get("cuda_toolkit_root"):  # torch's guess may lack the headers (a bare nvcc wrapper on PATH)
        env["CUDA_HOME"] = info["cuda_toolkit_root"]
    # --no-index, --disable-pip-version-check: the machine has no network, and must not wait on it.
    return [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
            "--disable-pip-version-check", "-e", "."], env


def build_step(ctx):
    command, env = build_command(ctx)
    code, seconds = run_logged(command, os.path.join(ctx["logs"], "build.log"), ctx["timeout"], env)
    record = dict(command=" ".join(command), seconds=seconds, cuda_home=env.get("CUDA_HOME"),
                  arch_list=env.get("TORCH_CUDA_ARCH_LIST"))
    if code != 0:
        why = f"timed out after {ctx['timeout']} s" if code is None else f"exit {code}"
        return dict(record, verdict="FAIL", reason=f"build failed ({why}): {tail(ctx['logs'], 'build')}")
    left = max(SHORTEST_USEFUL_S, ctx["timeout"] - seconds)
    ops, code, probe_seconds = run_probe("ops", ctx["logs"], left)
    record.update(details=ops, seconds=round(seconds + probe_seconds, 1))
    if ops is None:
        return dict(record, verdict="FAIL", reason=f"import tpmoe._C failed: {tail(ctx['logs'], 'probe_ops')}")
    kernels = ops["kernels"]
    missing_cpu = [op for op, keys in kernels.items() if "CPU" not in keys]
    if missing_cpu:
        return dict(record, verdict="FAIL", reason=f"tpmoe._C lacks CPU kernels for {missing_cpu}")
    if not ops["tpmoe_triton_imports"]:
        return dict(record, verdict="FAIL", reason=f"tpmoe.triton does not import: {ops['tpmoe_triton_problem']}")
    if ctx["mode"] == "dry":
        return dict(record, verdict="PASS", reason="dry: the CPU build (no CUDA sources in a CPU torch build); "
                    "route, align and the CPU expert ops registered")
    # align has no CUDA kernel in tpmoe._C: on CUDA it is the Triton op (tpmoe/triton/align.py).
    missing_cuda = [op for op in ("route",) if "CUDA" not in kernels[op]]
    if missing_cuda:
        toolkit = ctx["env"].get("cuda_toolkit_root")
        return dict(record, verdict="FAIL", reason=f"built without the CUDA sources: no CUDA kernel for {missing_cuda} "
                    f"(torch CUDA {ops['torch_cuda']}, CUDA toolkit {toolkit or 'not found (nvcc + headers)'})")
    return dict(record, verdict="PASS", reason=f"CUDA build for sm_90 in {seconds:.0f} s; route has CPU and CUDA "
                f"kernels, align CPU (Triton on CUDA)")


def dry_environment():
    """A dry step sees no GPU even where there is one (--mode dry on a GPU machine): the same
    CPU-and-interpreter run as in CI."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="")


def tests_step(ctx):
    junit = os.path.join(ctx["logs"], "tests.xml")
    if os.path.exists(junit):
        os.remove(junit)  # a stale report must not stand in for a run that wrote none
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *TEST_FILES]
    env = dry_environment() if ctx["mode"] == "dry" else dict(os.environ)
    if ctx["mode"] == "dry":
        command += ["-k", DRY_SELECTION]
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU
        if ctx["env"].get("xdist"):  # Triton compiles each kernel variant on the CPU: spread them out
            command += ["-n", str(min(16, ctx["env"].get("cpu_count") or 1))]
        if ctx["env"].get("pytest_timeout"):
            command += [f"--timeout={TEST_TIMEOUT_S}"]
    code, seconds = run_logged(command, os.path.join(ctx["logs"], "tests.log"), ctx["timeout"], env)
    results = parse_junit(junit) if os.path.exists(junit) else None
    verdict, reason = pytest_verdict(code, results, ctx["timeout"], tail(ctx["logs"], "tests"))
    if ctx["mode"] == "dry":
        reason = f"dry (a few cases of each file, Triton interpreter): {reason}"
    return dict(command=" ".join(command), seconds=seconds, exit_code=code, verdict=verdict, reason=reason,
                details=results)


def bench_step(ctx):
    raw = os.path.join(ctx["logs"], "bench_raw.json")
    if os.path.exists(raw):
        os.remove(raw)
    command = [sys.executable, "benchmarks/bench_kernels.py", "--backward", "--json", raw,
               "--markdown", os.path.join(ctx["logs"], "bench.md")]
    # On the GPU: short do_bench windows, so that T = 8192 Mixtral forward+backward (the heaviest,
    # about 35 ms a step) fits the cap with the rest.
    command += ["--dry"] if ctx["mode"] == "dry" else ["--warmup", "10", "--rep", "40"]
    env = dry_environment() if ctx["mode"] == "dry" else dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # bench_kernels.py sets it for --dry itself
    code, seconds = run_logged(command, os.path.join(ctx["logs"], "bench.log"), ctx["timeout"], env)
    payload = None
    if os.path.exists(raw):
        with open(raw) as handle:
            payload = json.load(handle)
    verdict, reason = bench_verdict(code, payload, ctx["timeout"], tail(ctx["logs"], "bench"))
    return dict(command=" ".join(command), seconds=seconds, exit_code=code, verdict=verdict, reason=reason,
                details=payload)


STEP_FUNCTIONS = {"env": env_step, "build": build_step, "tests": tests_step, "bench": bench_step}


def write_archive(out_dir, archive_path):
    """out_dir as one .tar.gz (under the folder's own name), written last so it holds everything."""
    os.makedirs(os.path.dirname(archive_path) or ".", exist_ok=True)
    with tarfile.open(archive_path, "w:gz") as archive:
        archive.add(out_dir, arcname=os.path.basename(out_dir))


def run(out_dir, requested_mode, archive_path=None):
    started = time.monotonic()
    logs = os.path.join(out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    ctx = dict(logs=logs, requested=requested_mode, mode="gpu" if requested_mode == "gpu" else "dry", env={})
    records = {}
    for step in STEPS:
        ctx["timeout"] = step_timeout(step, ctx["mode"], started)
        if step != "env" and records["env"]["verdict"] == "FAIL":
            record = dict(verdict="SKIP", reason="the env step failed", seconds=0.0)
        elif ctx["timeout"] < SHORTEST_USEFUL_S:
            record = dict(verdict="SKIP", reason=f"only {ctx['timeout']} s of the budget left", seconds=0.0)
        else:
            record = STEP_FUNCTIONS[step](ctx)
        record.update(step=step, mode=ctx["mode"], timeout_s=ctx["timeout"])
        records[step] = record
        if step == "env" and record.get("details"):
            ctx["env"] = record["details"]
            if requested_mode == "auto":
                ctx["mode"] = record["mode"] = "gpu" if ctx["env"]["cuda_available"] else "dry"
        with open(os.path.join(out_dir, f"{step}.json"), "w") as handle:
            json.dump(record, handle, indent=1)
        print(f"gpu-check {step:<6} {record['verdict']:<4} ({record['seconds']:.0f} s) {record['reason']}", flush=True)
    summary = dict(mode=ctx["mode"], date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   seconds=round(time.monotonic() - started, 1),
                   ok=all(record["verdict"] != "FAIL" for record in records.values()),
                   steps=[{key: records[s][key] for key in ("step", "verdict", "reason", "seconds", "timeout_s")}
                          for s in STEPS])
    with open(os.path.join(out_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as handle:
        handle.write(summary_markdown(summary, records, logs))
    if archive_path:
        write_archive(out_dir, archive_path)
    print(f"gpu-check: {'PASS' if summary['ok'] else 'FAIL'} in {summary['seconds']:.0f} s ({ctx['mode']}); "
          f"evidence in {out_dir}/ (summary.md)" + (f" and {archive_path}" if archive_path else ""), flush=True)
    return 0 if summary["ok"] else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "gpu-check"),
                        help="folder for the evidence (created)")
    parser.add_argument("--mode", choices=("auto", "gpu", "dry"), default="auto",
                        help="auto: gpu where torch sees a CUDA GPU, else dry; gpu: fail without one")
    parser.add_argument("--archive", default=None, help="also pack the folder into this .tar.gz file")
    args = parser.parse_args(argv)
    if args.archive and not args.archive.endswith((".tar.gz", ".tgz")):
        parser.error(f"--archive: expected a path ending in .tar.gz or .tgz, got {args.archive!r}")
    return run(os.path.abspath(args.out), args.mode, args.archive and os.path.abspath(args.archive))


if __name__ == "__main__":
    sys.exit(main())
