"""The CPU experts' two bf16 GEMMs side by side, in one run (issue 36): the native one and the
widened one (float32 GEMMs on tiles widened from bf16, csrc/experts_cpu_widen.cpp), forced by
TPMOE_CPU_BF16_GEMM per call (the ops read it at every call), against the fp32-weights path,
a float32 and a bf16 dense GEMM of equal FLOPs (one big GEMM: `dense_*`), the same experts' GEMMs
in float32 expert by expert (`experts_fp32`: what the vendor's GEMM reaches on these shapes), and the
bf16 read floor. The widened GEMM runs with each float32 kernel the CPU has
(TPMOE_CPU_WIDEN_KERNEL, also read at every call):
`widen` the one `auto` picks, `widen_avx2` the AVX2 kernel (what an AVX2-only CPU runs; on a
CPU with AVX-512 its FMAs are half as wide as the dense GEMM's), `widen_aten` ATen's float32
GEMM on the widened tiles (the portable path, and the widened GEMM as it was before its
kernels: a before/after in one run).

Qwen3-30B-A3B's expert shape (H = 2048, I = 768, E = 128, top-8; tpmoe.presets), bf16:
forward at each --tokens, forward + backward at --train-tokens. Median, fastest and slowest
of --repeats interleaved rounds (tpmoe.cli.timing); rates and ratios from the fastest runs.

  python benchmarks/cpu_bf16_widen.py                      # T = 1, 32, 512; train at 512
  python benchmarks/cpu_bf16_widen.py --tokens 1 32 --train-tokens --repeats 3 --json out.json
  python benchmarks/cpu_bf16_widen.py --emulate-avx2     # an AVX2-only CPU, on one with AVX-512

--emulate-avx2 runs the benchmark as an AVX2-only CPU would, as far as one with AVX-512 can:
ATen's kernels (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA) and MKL, whose float32 GEMM is
ATen's (MKL_ENABLE_INSTRUCTIONS), are held to AVX2, so the dense yardsticks drop to what such a
CPU has (the bf16 one collapses to ATen's emulated bf16 GEMM), and the widened GEMM runs its
AVX2 kernel. The native bf16 path is left out there (it is not what such a CPU runs), and the
emulated dense bf16 GEMM is timed at T = 1 only (0.1 to 1.2 GFLOP/s: a T = 512 call would
take minutes).
"""
import os
import sys

# Set before torch loads: ATen reads its capability once, MKL and oneDNN on their first call.
EMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
if "--emulate-avx2" in sys.argv[1:] and any(os.environ.get(k) != v for k, v in EMULATED_AVX2.items()):
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **EMULATED_AVX2})

import argparse  # noqa: E402
import datetime  # noqa: E402
import subprocess  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_expert_weights  # noqa: E402

from tpmoe.cli.report import format_table, write_json  # noqa: E402
from tpmoe.cli.timing import time_calls_interleaved  # noqa: E402
from tpmoe.cli.workload import (dense_step, expert_gemms_step, random_routing, routed_expert_flops, touched_bytes,  # noqa: E402
                                weight_read_step)
from tpmoe.cpu import bf16_gemm_path  # noqa: E402
from tpmoe.fused import fused_experts  # noqa: E402
from tpmoe.presets import get_preset  # noqa: E402

ENV = "TPMOE_CPU_BF16_GEMM"
KERNEL_ENV = "TPMOE_CPU_WIDEN_KERNEL"


def cpu_description():
    """lscpu's model name and whether the CPU reports avx512_bf16 / amx_bf16."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lscpu.splitlines() if line.startswith("Flags")), [])
    return (f"{model}; avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}, "
            f"amx_bf16: {'yes' if 'amx_bf16' in flags else 'no'}, avx2: {'yes' if 'avx2' in flags else 'no'}")


def on_path(path, call, kernel="auto"):
    """call() with the native CPU ops forced onto `path`'s bf16 GEMM (and the widened GEMM's
    float32 kernel onto `kernel`)."""
    def run():
        os.environ[ENV] = path
        os.environ[KERNEL_ENV] = kernel
        return call()
    return run


def widen_kernels_available(emulate_avx2):
    """The widened GEMM's kernels this CPU and build have (the op refuses one they lack); under
    emulation the `widen` row already is the AVX2 kernel."""
    available = []
    x = torch.ones(1, 16, dtype=torch.bfloat16)
    w_gate_up, w_down = torch.ones(1, 32, 16, dtype=torch.bfloat16), torch.ones(1, 16, 16, dtype=torch.bfloat16)
    for kernel in (("aten",) if emulate_avx2 else ("avx2", "aten")):
        try:
            on_path("widen", lambda: fused_experts(x, w_gate_up, w_down, torch.zeros(1, 1, dtype=torch.int64),
                                                   torch.ones(1, 1), backend="cpu"), kernel)()
            available.append(kernel)
        except RuntimeError:
            pass
    os.environ.pop(ENV, None)
    os.environ.pop(KERNEL_ENV, None)
    return available


def dense(config, num_tokens, flops, mode, dtype):
    """The dense GEMM of equal FLOPs in exactly `dtype` (workload.dense_step would pick the
    faster of bf16 and float32: here both are shown)."""
    step = dense_step(config, num_tokens, flops, mode, torch.float32, None)
    if dtype == torch.float32:
        return step
    rows, columns = num_tokens * config.top_k, max(1, -(-flops // (2 * num_tokens * config.top_k * config.hidden_size)))
    a = torch.randn(rows, config.hidden_size, dtype=dtype, requires_grad=mode != "fwd")
    b = torch.randn(config.hidden_size, columns, dtype=dtype, requires_grad=mode != "fwd")
    grad = torch.randn(rows, columns, dtype=dtype)
    if mode == "fwd":
        return lambda: a @ b

    def train():
        a.grad = b.grad = None
        (a @ b).backward(grad)
    return train


def measure(config, num_tokens, mode, weights, weights32, args, generator):
    ids, topk_weights = random_routing(config, num_tokens, generator=generator)
    x = torch.randn(num_tokens, config.hidden_size, generator=generator).bfloat16()
    flops = routed_expert_flops(config, num_tokens) * (1 if mode == "fwd" else 3)
    grad_out = torch.randn(num_tokens, config.hidden_size, generator=generator).bfloat16()

    def experts(tensors, x_in):
        if mode == "fwd":
            return lambda: fused_experts(x_in, tensors["w_gate_up"], tensors["w_down"], ids, topk_weights,
                                         backend="cpu")
        leaves = [x_in.detach().requires_grad_(True), tensors["w_gate_up"].detach().requires_grad_(True),
                  tensors["w_down"].detach().requires_grad_(True)]

        def step():
            for leaf in leaves:
                leaf.grad = None
            fused_experts(*leaves, ids, topk_weights, backend="cpu").backward(grad_out.to(x_in.dtype))
        return step

    calls = {} if args.emulate_avx2 else {"native": on_path("native", experts(weights, x))}
    calls["widen"] = on_path("widen", experts(weights, x), "avx2" if args.emulate_avx2 else "auto")
    for kernel in args.widen_kernels:
        calls[f"widen_{kernel}"] = on_path("widen", experts(weights, x), kernel)
    calls.update({"fp32_weights": experts(weights32, x.float()),
                  "dense_fp32": dense(config, num_tokens, flops, mode, torch.float32),
                  "experts_fp32": expert_gemms_step(config, ids, mode)})
    if not args.emulate_avx2 or (num_tokens == 1 and mode == "fwd"):
        calls["dense_bf16"] = dense(config, num_tokens, flops, mode, torch.bfloat16)
    if mode == "fwd":
        calls["floor_bf16"] = weight_read_step(ids, [weights["w_gate_up"], weights["w_down"]], "fwd")
    grad_mode = torch.no_grad() if mode == "fwd" else torch.enable_grad()
    with grad_mode:
        results = time_calls_interleaved(calls, warmup=args.warmup, repeats=args.repeats)
    os.environ.pop(ENV, None)
    os.environ.pop(KERNEL_ENV, None)
    best = {name: result.min_s for name, result in results.items()}
    weight_bytes = touched_bytes(ids, weights["w_gate_up"], weights["w_down"])
    rows = []
    for name, result in results.items():
        row = dict(T=num_tokens, pass_=mode, impl=name, ms=result.median_s * 1e3, ms_min=result.min_s * 1e3,
                   ms_max=max(result.samples_s) * 1e3,
                   gflops=flops / best[name] / 1e9 if not name.startswith("floor") else None)
        if name in ("native", "fp32_weights") or name.startswith("widen"):
            row["of_dense_fp32"] = best["dense_fp32"] / best[name]
            row["of_experts_fp32"] = best["experts_fp32"] / best[name]
            row["x_floor"] = best[name] / best["floor_bf16"] if "floor_bf16" in best else None
            row["widen_vs_native"] = best["native"] / best[name] if name.startswith("widen") and "native" in best else None
        if name == "floor_bf16":
            row["gbs"] = weight_bytes / best[name] / 1e9
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 32, 512])
    parser.add_argument("--train-tokens", type=int, nargs="*", default=[512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--emulate-avx2", action="store_true", help="see above")
    args = parser.parse_args()
    args.widen_kernels = widen_kernels_available(args.emulate_avx2)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = get_preset("qwen3-30b-a3b").config
    generator = torch.Generator().manual_seed(0)
    weights = make_expert_weights(config, torch.bfloat16, generator=generator)
    # The fp32-weights path: the same values widened once, up front (the thing the widened
    # GEMM avoids holding).
    weights32 = {name: tensor.float() for name, tensor in weights.items()}
    os.environ.pop(ENV, None)
    header = [f"# {datetime.date.today()}  {cpu_description()}",
              f"# torch {torch.__version__}, {torch.get_num_threads()} threads, auto picks: {bf16_gemm_path()}",
              f"# {' '.join([os.path.basename(sys.executable)] + sys.argv)}"]
    if args.emulate_avx2:
        header.append(f"# emulated AVX2: ATen capability {torch.backends.cpu.get_cpu_capability()}, "
                      + ", ".join(f"{k}={os.environ.get(k)}" for k in EMULATED_AVX2) + "; widen = the AVX2 kernel")
    print("\n".join(header), flush=True)
    rows = []
    for mode, token_counts in (("fwd", args.tokens), ("train", args.train_tokens)):
        for num_tokens in token_counts:
            rows += measure(config, num_tokens, mode, weights, weights32, args, generator)
            print(f"# done T = {num_tokens} {mode}", file=sys.stderr, flush=True)
    columns = ["T", "pass_", "impl", "ms", "ms_min", "ms_max", "gflops", "gbs", "of_dense_fp32", "of_experts_fp32",
               "x_floor", "widen_vs_native"]
    formats = {"ms": ".2f", "ms_min": ".2f", "ms_max": ".2f", "gflops": ".1f", "gbs": ".1f", "of_dense_fp32": ".2f",
               "of_experts_fp32": ".2f", "x_floor": ".2f", "widen_vs_native": ".2f"}
    print(format_table(rows, columns, formats, headers={"pass_": "pass"}, markdown=True))
    if args.json:
        write_json(args.json, dict(header=header, rows=rows))


if __name__ == "__main__":
    main()
