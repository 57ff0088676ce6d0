"""The CPU expert path against its yardsticks, in one run (issue 6).

For each preset (tpmoe.presets: real model layer shapes; bf16) and token count T:
  tpmoe      tpmoe.fused_experts(backend="cpu") (the native ops of csrc/experts_cpu_*.cpp)
  hf_eager   transformers' experts module, "eager" (its per-expert Python loop)
  hf_grouped transformers' experts module, "grouped_mm"
  dense      one bf16 GEMM [T*K, H] x [H, 3I]: the same FLOPs, the compute ceiling
  floor      a plain read (sum) of as many experts' weights as the routing touches: the
             bandwidth floor
All on the same weights and routing (tpmoe.cli.workload). Median (ms) and fastest (ms_min) of
repeats after warm-up, the implementations timed interleaved, one call each per round (so all of
them sample the same moments of a machine whose speed drifts; tpmoe.cli.timing); the rates and
ratios use the fastest run of each implementation (the one no other job on a shared machine
disturbed). Forward at every T; forward+backward (tpmoe vs hf_eager under autograd) at
--backward-tokens.

  python benchmarks/bench_cpu.py                       # both presets, T in 1..2048
  python benchmarks/bench_cpu.py --preset qwen3-30b-a3b --tokens 1 32 --repeats 3 --json out.json
"""
import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_expert_weights, make_hf_experts  # noqa: E402

from tpmoe.cli.hf_blocks import HFUnavailable  # noqa: E402
from tpmoe.cli.report import format_table, write_json  # noqa: E402
from tpmoe.cli.timing import peak_memory_bytes, time_call, time_calls_interleaved  # noqa: E402
from tpmoe.cli.workload import (dense_step, random_routing, routed_expert_flops, touched_bytes,  # noqa: E402
                                weight_read_step)
from tpmoe.cpu import release_workspace  # noqa: E402
from tpmoe.fused import fused_experts  # noqa: E402
from tpmoe.presets import PRESETS, get_preset, scaled_config  # noqa: E402

DEFAULT_PRESETS = ("qwen3-30b-a3b", "mixtral-8x7b")
DEFAULT_TOKENS = (1, 8, 32, 128, 512, 2048)
DTYPE = torch.bfloat16


def hf_experts(preset, config, weights, implementation):
    """transformers' experts module on our tensors, or None where transformers lacks it."""
    try:
        return make_hf_experts(preset.family, config, weights, implementation)
    except HFUnavailable:
        return None


def bench_forward(preset, config, num_tokens, weights, args, generator):
    w_gate_up, w_down = weights["w_gate_up"], weights["w_down"]
    x = torch.randn(num_tokens, config.hidden_size, generator=generator).to(DTYPE)
    ids, topk_weights = random_routing(config, num_tokens, generator=generator)
    flops = routed_expert_flops(config, num_tokens)
    weight_bytes = touched_bytes(ids, w_gate_up, w_down)
    timing = dict(warmup=args.warmup, repeats=args.repeats, min_time_s=args.min_time)

    calls = {"tpmoe": lambda: fused_experts(x, w_gate_up, w_down, ids, topk_weights, backend="cpu")}
    for implementation, name in (("eager", "hf_eager"), ("grouped_mm", "hf_grouped")):
        module = hf_experts(preset, config, weights, implementation)
        if module is not None:
            calls[name] = (lambda m: lambda: m(x, ids, topk_weights.to(x.dtype)))(module)
    calls["dense"] = dense_step(config, num_tokens, flops, "fwd", DTYPE, None)
    calls["floor"] = weight_read_step(ids, [w_gate_up, w_down], "fwd")

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
        row = dict(preset=preset.name, T=num_tokens, impl=name, pass_="fwd", ms=result.median_s * 1e3,
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


def bench_backward(preset, config, num_tokens, weights, args, generator):
    weights = {name: weight.detach().requires_grad_(True) for name, weight in weights.items()}
    w_gate_up, w_down = weights["w_gate_up"], weights["w_down"]
    x = torch.randn(num_tokens, config.hidden_size, generator=generator).to(DTYPE).requires_grad_(True)
    ids, topk_weights = random_routing(config, num_tokens, generator=generator)
    topk_weights.requires_grad_(True)
    grad_out = torch.randn(num_tokens, config.hidden_size, generator=generator).to(DTYPE)
    flops = 3 * routed_expert_flops(config, num_tokens)
    leaves = (x, w_gate_up, w_down, topk_weights)

    def step(forward):
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad_out)

    calls = {"tpmoe": lambda: step(lambda: fused_experts(x, w_gate_up, w_down, ids, topk_weights, backend="cpu"))}
    module = hf_experts(preset, config, weights, "eager")
    if module is not None:
        calls["hf_eager"] = lambda: step(lambda: module(x, ids, topk_weights.to(x.dtype)))
    # transformers' eager backward takes about a minute on the Qwen3 shape (it zero-fills a
    # full [E, 2I, H] gradient per expert): one timed run, no warm-up, is enough there.
    # Peak memory is not reported here: the profiler misses frees done inside the autograd
    # engine, so its running sum is not the live memory.
    results = {name: time_call(call, warmup=0 if name == "hf_eager" else 1,
                               repeats=1 if name == "hf_eager" else args.backward_repeats)
               for name, call in calls.items()}
    for leaf in leaves:
        leaf.grad = None
    rows = []
    for name, result in results.items():
        row = dict(preset=preset.name, T=num_tokens, impl=name, pass_="fwd+bwd", ms=result.median_s * 1e3,
                   ms_min=result.min_s * 1e3, gflops=flops / result.min_s / 1e9)
        if name == "tpmoe" and "hf_eager" in results:
            row["speedup_vs_hf"] = results["hf_eager"].min_s / result.min_s
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=list(PRESETS), default=list(DEFAULT_PRESETS),
                        help="tpmoe.presets names (`tpmoe --list-presets`)")
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
    parser.add_argument("--scale", type=float, default=1.0,
                        help="hidden and intermediate sizes times this (tpmoe.presets.scaled_config)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    rows = []
    for preset_name in args.preset:
        preset = get_preset(preset_name)
        config = scaled_config(preset.config, args.scale)
        weights = make_expert_weights(config, DTYPE, generator=generator)
        for num_tokens in args.tokens:
            rows += bench_forward(preset, config, num_tokens, weights, args, generator)
            print(format_table([r for r in rows if r["T"] == num_tokens and r["preset"] == preset_name],
                               COLUMNS, FORMATS, markdown=True), flush=True)
        for num_tokens in args.backward_tokens:
            rows += bench_backward(preset, config, num_tokens, weights, args, generator)
        del weights

    header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, bf16; command: python benchmarks/bench_cpu.py "
              + " ".join(argv if argv is not None else sys.argv[1:]))
    print("\n" + header)
    print(format_table(rows, COLUMNS, FORMATS, markdown=True))
    if args.json:
        write_json(args.json, dict(header=header, rows=rows))


COLUMNS = ["preset", "T", "impl", "pass_", "ms", "ms_min", "gflops", "gbs", "of_ceiling", "x_floor", "speedup_vs_hf",
           "peak_mib", "max_rel_err_vs_hf"]
FORMATS = dict(ms=".3f", ms_min=".3f", gflops=".1f", gbs=".1f", of_ceiling=".2f", x_floor=".2f", speedup_vs_hf=".2f",
               peak_mib=".0f", max_rel_err_vs_hf=".1e")

if __name__ == "__main__":
    main()
