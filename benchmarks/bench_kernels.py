"""The Triton expert kernels on a GPU against their yardsticks, in one run (issue 3).

For each preset (real model layer shapes, bf16) and token count T:
  tpmoe        tpmoe.triton.fused_experts_triton (forward; and forward+backward with --backward)
  grouped_mm   torch._grouped_mm twice with the activation between (sort, gather, GEMM, act, GEMM,
               weight, unsort, sum): the same algorithm on PyTorch's grouped GEMM
  hf_grouped   transformers' experts module with experts_implementation="grouped_mm"
  matmul_peak  a large bf16 matmul measured once: the machine's reachable TFLOP/s
Reported: median ms (triton.testing.do_bench), TFLOP/s of the useful work (2*T*K*H*3I forward,
3x that for forward+backward; our recompute of the gate/up pre-activation is not counted), and
the fraction of the measured matmul peak. Prints a Markdown table and writes JSON.

  python benchmarks/bench_kernels.py                                  # both presets, T in 1..16384
  python benchmarks/bench_kernels.py --preset qwen3 --tokens 1 512 --backward --json out.json
  python benchmarks/bench_kernels.py --results-md benchmarks/RESULTS.md   # append the dated table
"""
import argparse
import datetime
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import format_table, make_hf_experts, write_json  # noqa: E402

PRESETS = {
    "qwen3": dict(hidden=2048, inter=768, experts=128, top_k=8, family="qwen3_moe"),
    "mixtral": dict(hidden=4096, inter=14336, experts=8, top_k=2, family="mixtral"),
}
DEFAULT_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def require_cuda():
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py: needs a CUDA GPU, and torch.cuda.is_available() is False on this "
                         "machine (torch " + torch.__version__ + "). The CPU path's benchmark is "
                         "benchmarks/bench_cpu.py.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench_kernels.py: unset TRITON_INTERPRET: it makes the kernels run in the interpreter")


def matmul_peak_tflops(do_bench, size=8192):
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300)
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def make_problem(preset, num_tokens, generator):
    H, I, E, K = preset["hidden"], preset["inter"], preset["experts"], preset["top_k"]
    w_gate_up = (torch.randn(E, 2 * I, H, device="cuda", generator=generator) / math.sqrt(H)).bfloat16()
    w_down = (torch.randn(E, H, I, device="cuda", generator=generator) / math.sqrt(I)).bfloat16()
    x = torch.randn(num_tokens, H, device="cuda", generator=generator).bfloat16()
    logits = torch.randn(num_tokens, E, device="cuda", generator=generator)
    weights, ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)
    return x, w_gate_up, w_down, ids, weights / weights.sum(dim=-1, keepdim=True)


def torch_grouped_mm_experts(x, w_gate_up, w_down, ids, topk_weights):
    """The same computation on torch._grouped_mm (concatenated gate/up, silu)."""
    num_tokens, top_k = ids.shape
    flat_ids = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat_ids)
    offsets = torch.cumsum(torch.bincount(flat_ids, minlength=w_gate_up.shape[0]), 0).to(torch.int32)
    gate_up = torch._grouped_mm(x[order // top_k], w_gate_up.transpose(1, 2), offs=offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down.transpose(1, 2), offs=offsets)
    out = out * topk_weights.reshape(-1)[order, None].to(out.dtype)
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted.view(num_tokens, top_k, -1).float().sum(1).to(x.dtype)


def bench_one(preset_name, preset, num_tokens, peak, args, generator, do_bench):
    from tpmoe.triton import fused_experts_triton

    x, w_gate_up, w_down, ids, topk_weights = make_problem(preset, num_tokens, generator)
    H, I, K = preset["hidden"], preset["inter"], preset["top_k"]
    flops_forward = 2 * num_tokens * K * H * 3 * I
    options = dict(activation="silu", layout="concatenated", gated=True, b_gate_up=None, b_down=None,
                   alpha=1.702, limit=7.0)
    calls = {
        "tpmoe": lambda x, wgu, wd, tw: fused_experts_triton(x, wgu, wd, ids, tw, **options),
        "grouped_mm": lambda x, wgu, wd, tw: torch_grouped_mm_experts(x, wgu, wd, ids, tw),
    }
    hf = make_hf_experts(preset, w_gate_up, w_down, "grouped_mm")
    if hf is not None:
        calls["hf_grouped"] = lambda x, wgu, wd, tw: hf(x, ids, tw.to(x.dtype))
    rows = []
    with torch.no_grad():
        reference = calls["grouped_mm"](x, w_gate_up, w_down, topk_weights).float()
        ours = calls["tpmoe"](x, w_gate_up, w_down, topk_weights).float()
        error = ((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
        for name, call in calls.items():
            ms = do_bench(lambda: call(x, w_gate_up, w_down, topk_weights), warmup=args.warmup, rep=args.rep)
            tflops = flops_forward / (ms * 1e-3) / 1e12
            rows.append(dict(preset=preset_name, T=num_tokens, impl=name, pass_="fwd", ms=ms, tflops=tflops,
                             of_peak=tflops / peak, max_rel_err_vs_grouped_mm=error if name == "tpmoe" else None))
    if args.backward:
        grad_out = torch.randn_like(x)
        for name in ("tpmoe", "grouped_mm"):
            leaves = [t.detach().requires_grad_(True) for t in (x, w_gate_up, w_down, topk_weights)]

            def step(name=name, leaves=leaves):
                for leaf in leaves:
                    leaf.grad = None
                calls[name](*leaves).backward(grad_out)

            ms = do_bench(step, warmup=args.warmup, rep=args.rep)
            tflops = 3 * flops_forward / (ms * 1e-3) / 1e12
            rows.append(dict(preset=preset_name, T=num_tokens, impl=name, pass_="fwd+bwd", ms=ms, tflops=tflops,
                             of_peak=tflops / peak))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--tokens", type=int, nargs="*", default=list(DEFAULT_TOKENS))
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    parser.add_argument("--json", default="bench_kernels.json")
    parser.add_argument("--results-md", default=None, help="append the dated table to this Markdown file")
    args = parser.parse_args(argv)
    require_cuda()
    from triton.testing import do_bench

    generator = torch.Generator(device="cuda").manual_seed(0)
    peak = matmul_peak_tflops(do_bench)
    device = torch.cuda.get_device_name()
    print(f"# {device}: measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for preset_name in args.preset:
        for num_tokens in args.tokens:
            new_rows = bench_one(preset_name, PRESETS[preset_name], num_tokens, peak, args, generator, do_bench)
            rows += new_rows
            print(format_table(new_rows, ["preset", "T", "impl", "pass_", "ms", "tflops", "of_peak"],
                               {"ms": ".3f", "tflops": ".1f", "of_peak": ".2f"}), flush=True)
    columns = ["preset", "T", "impl", "pass_", "ms", "tflops", "of_peak", "max_rel_err_vs_grouped_mm"]
    table = format_table(rows, columns, {"ms": ".3f", "tflops": ".1f", "of_peak": ".2f",
                                         "max_rel_err_vs_grouped_mm": ".1e"})
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print("\n" + table)
    write_json(args.json, dict(date=stamp, device=device, torch=torch.__version__, matmul_peak_tflops=peak,
                               rows=rows))
    if args.results_md:
        with open(args.results_md, "a") as handle:
            handle.write(f"\n## bench_kernels.py, {stamp}, {device} (bf16 matmul peak {peak:.0f} TFLOP/s)\n\n"
                         f"{table}\n")


if __name__ == "__main__":
    main()
