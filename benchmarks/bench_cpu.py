"""The CPU expert path against its yardsticks, in one run (issue 6).

For each preset (real model layer shapes, bf16) and token count T:
  tpmoe      tpmoe.fused_experts(backend="cpu") (the native ops of csrc/experts_cpu_*.cpp)
  hf_eager   transformers' experts module, "eager" (its per-expert Python loop)
  hf_grouped transformers' experts module, "grouped_mm"
  dense      one bf16 GEMM [T*K, H] x [H, 3I]: the same FLOPs, the compute ceiling
  floor      a plain read (sum) of as many experts' weights as the routing touches: the
             bandwidth floor
All on the same weights and routing. Median (ms) and fastest (ms_min) of repeats after
warm-up, the implementations timed in turn, one call each per round (so all of them sample
the same moments of a machine whose speed drifts); the rates and ratios use the fastest run
of each implementation (the one no other job on a shared machine disturbed). Forward at every T;
forward+backward (tpmoe vs hf_eager under autograd) at --backward-tokens.

  python benchmarks/bench_cpu.py                       # both presets, T in 1..2048
  python benchmarks/bench_cpu.py --preset qwen3 --tokens 1 32 --repeats 3 --json out.json
"""
import argparse
import datetime
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (format_table, make_hf_experts, peak_memory_bytes, time_call,  # noqa: E402
                    time_calls_interleaved, touched_weight_bytes, write_json)

from tpmoe.cpu import release_workspace  # noqa: E402
from tpmoe.fused import fused_experts  # noqa: E402

PRESETS = {
    # name: (H, I, E, K, transformers model type)
    "qwen3": dict(hidden=2048, inter=768, experts=128, top_k=8, family="qwen3_moe"),
    "mixtral": dict(hidden=4096, inter=14336, experts=8, top_k=2, family="mixtral"),
}
DEFAULT_TOKENS = (1, 8, 32, 128, 512, 2048)


def make_weights(preset, dtype, generator):
    H, I, E = preset["hidden"], preset["inter"], preset["experts"]
    w_gate_up = torch.empty(E, 2 * I, H, dtype=dtype)
    w_down = torch.empty(E, H, I, dtype=dtype)
    for expert in range(E):  # per expert: keeps the float32 temporaries small
        w_gate_up[expert] = torch.randn(2 * I, H, generator=generator) / math.sqrt(H)
        w_down[expert] = torch.randn(H, I, generator=generator) / math.sqrt(I)
    return w_gate_up, w_down


def make_routing(num_tokens, preset, generator):
    logits = torch.randn(num_tokens, preset["experts"], generator=generator)
    weights, ids = torch.softmax(logits, dim=-1).topk(preset["top_k"], dim=-1)
    return ids, weights / weights.sum(dim=-1, keepdim=True)


def bench_forward(preset_name, preset, num_tokens, weights, args, generator):
    w_gate_up, w_down = weights
    H, I, K = preset["hidden"], preset["inter"], preset["top_k"]
    x = torch.randn(num_tokens, H, generator=generator).to(w_gate_up.dtype)
    ids, topk_weights = make_routing(num_tokens, preset, generator)
    flops = 2 * num_tokens * K * H * 3 * I
    experts, weight_bytes = touched_weight_bytes(ids, w_gate_up, w_down)
    timing = dict(warmup=args.warmup, repeats=args.repeats, min_time_s=args.min_time)

    calls = {"tpmoe": lambda: fused_experts(x, w_gate_up, w_down, ids, topk_weights, backend="cpu")}
    for implementation, name in (("eager", "hf_eager"), ("grouped_mm", "hf_grouped")):
        module = make_hf_experts(preset, w_gate_up, w_down, implementation)
        if module is not None:
            calls[name] = (lambda m: lambda: m(x, ids, topk_weights.to(x.dtype)))(module)
    dense_x = torch.randn(num_tokens * K, H, generator=generator).to(w_gate_up.dtype)
    dense_w = torch.randn(H, 3 * I, generator=generator).to(w_gate_up.dtype)
    calls["dense"] = lambda: dense_x @ dense_w
    # The same number of bytes in one contiguous pass per tensor (experts 0..n-1): a per-expert
    # loop would add a call overhead per expert to the floor and flatter the ratio.
    touched_gate_up, touched_down = w_gate_up[:len(experts)], w_down[:len(experts)]
    calls["floor"] = lambda: (touched_gate_up.sum(), touched_down.sum())

    rows = []
    with torch.no_grad():
        reference = calls["hf_eager"]() if "hf_eager" in calls else None
        ours = calls["tpmoe"]()
        error = None
        if reference is not None:
            error = ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
        results = time_calls_interleaved(calls, **timing)
        # The forward keeps its scratch buffer between calls (tpmoe.cpu.release_workspace):
        # released first, the measured call allocates it again and its peak counts it.
        release_workspace()
        peak = {name: peak_memory_bytes(calls[name]) for name in ("tpmoe", "hf_eager") if name in calls} \
            if args.memory else {}
    # Ratios use each implementation's fastest run: on a machine shared with other jobs the
    # fastest run is the one nobody else disturbed, for every implementation alike.
    best = {name: result.min_s for name, result in results.items()}
    hf_best = min((best[name] for name in ("hf_eager", "hf_grouped") if name in best), default=None)
    for name, result in results.items():
        seconds = best[name]
        row = dict(preset=preset_name, T=num_tokens, impl=name, pass_="fwd", ms=result.median_s * 1e3,
                   ms_min=seconds * 1e3,
                   gflops=flops / seconds / 1e9 if name != "floor" else None,
                   gbs=weight_bytes / seconds / 1e9 if name != "dense" else None)
        if name == "tpmoe":
            row["of_ceiling"] = best["dense"] / seconds
            row["x_floor"] = seconds / best["floor"]
            row["speedup_vs_hf"] = hf_best / seconds if hf_best else None
            row["max_rel_err_vs_hf"] = error
        if name in peak:
            row["peak_mib"] = peak[name] / 2**20
        rows.append(row)
    return rows


def bench_backward(preset_name, preset, num_tokens, weights, args, generator):
    w_gate_up, w_down = (weight.detach().requires_grad_(True) for weight in weights)
    H, I, K = preset["hidden"], preset["inter"], preset["top_k"]
    x = torch.randn(num_tokens, H, generator=generator).to(w_gate_up.dtype).requires_grad_(True)
    ids, topk_weights = make_routing(num_tokens, preset, generator)
    topk_weights.requires_grad_(True)
    grad_out = torch.randn(num_tokens, H, generator=generator).to(w_gate_up.dtype)
    flops = 3 * 2 * num_tokens * K * H * 3 * I
    leaves = (x, w_gate_up, w_down, topk_weights)

    def step(forward):
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad_out)

    calls = {"tpmoe": lambda: step(lambda: fused_experts(x, w_gate_up, w_down, ids, topk_weights, backend="cpu"))}
    module = make_hf_experts(preset, w_gate_up, w_down, "eager")
    if module is not None:
        calls["hf_eager"] = lambda: step(lambda: module(x, ids, topk_weights.to(x.dtype)))
    # transformers' eager backward takes about a minute on the Qwen3 shape (it zero-fills a
    # full [E, 2I, H] gradient per expert): one timed run, no warm-up, is enough there.
    results = {name: time_call(call, warmup=0 if name == "hf_eager" else 1,
                               repeats=1 if name == "hf_eager" else args.backward_repeats)
               for name, call in calls.items()}
    # Peak memory is not reported here: the profiler misses frees done inside the autograd
    # engine, so its running sum is not the live memory.
    peak = {}
    for leaf in leaves:
        leaf.grad = None
    rows = []
    for name, result in results.items():
        row = dict(preset=preset_name, T=num_tokens, impl=name, pass_="fwd+bwd", ms=result.median_s * 1e3,
                   ms_min=result.min_s * 1e3, gflops=flops / result.min_s / 1e9)
        if name == "tpmoe" and "hf_eager" in results:
            row["speedup_vs_hf"] = results["hf_eager"].min_s / result.min_s
        if name in peak:
            row["peak_mib"] = peak[name] / 2**20
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["qwen3", "mixtral"])
    parser.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
    parser.add_argument("--backward-tokens", nargs="*", type=int, default=[512],
                        help="token counts for forward+backward (none: skip)")
    parser.add_argument("--backward-repeats", type=int, default=3,
                        help="timed forward+backward runs of tpmoe (transformers' eager: one)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of repeats for short calls")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    rows = []
    for preset_name in args.preset:
        preset = PRESETS[preset_name]
        weights = make_weights(preset, torch.bfloat16, generator)
        for num_tokens in args.tokens:
            rows += bench_forward(preset_name, preset, num_tokens, weights, args, generator)
            print(format_table([r for r in rows if r["T"] == num_tokens and r["preset"] == preset_name],
                               COLUMNS, FORMATS), flush=True)
        for num_tokens in args.backward_tokens:
            rows += bench_backward(preset_name, preset, num_tokens, weights, args, generator)
        del weights

    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, bf16; command: python benchmarks/bench_cpu.py "
              + " ".join(argv if argv is not None else sys.argv[1:]))
    print("\n" + header)
    print(format_table(rows, COLUMNS, FORMATS))
    if args.json:
        write_json(args.json, dict(header=header, rows=rows))


COLUMNS = ["preset", "T", "impl", "pass_", "ms", "ms_min", "gflops", "gbs", "of_ceiling", "x_floor", "speedup_vs_hf",
           "peak_mib", "max_rel_err_vs_hf"]
FORMATS = dict(ms=".3f", ms_min=".3f", gflops=".1f", gbs=".1f", of_ceiling=".2f", x_floor=".2f", speedup_vs_hf=".2f",
               peak_mib=".0f", max_rel_err_vs_hf=".1e")

if __name__ == "__main__":
    main()
