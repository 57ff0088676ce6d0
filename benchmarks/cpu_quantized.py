"""Quantized experts on the CPU (issues 34, 35), in one run: tpmoe's fp8 / MXFP4 path (the native
op that dequantizes the weights where they are used, csrc/experts_cpu_quantized.cpp) against
tpmoe's own bf16 path on the same expert shapes, and the read floors (a plain read of the touched
experts' stored bytes, and of their bf16 bytes), forward.

Expert shapes of tpmoe.presets: Qwen3-30B-A3B (fp8, H = 2048, I = 768, E = 128, top-8),
GPT-OSS-20B (MXFP4, H = 2880, I = 2880, E = 32, top-4) and Mixtral-8x7B (fp8, H = 4096,
I = 14336, E = 8, top-2; about 3 GiB of bf16 weights, so only on request), fp8 block size 128.
Median, fastest and slowest of --repeats interleaved rounds (tpmoe.cli.timing); ratios from the
fastest runs:
  x_floor   quantized time / the stored bytes' read floor (the issues' decode target: <= 1.3)
  vs_bf16   bf16 time / quantized time (decode targets: fp8 >= 1.6, MXFP4 T = 1 >= 2.5;
            prefill, T = 512, >= 0.8)

  python benchmarks/cpu_quantized.py --threads 1                # Qwen3 and GPT-OSS, T = 1, 8, 32, 512
  python benchmarks/cpu_quantized.py --presets mixtral-8x7b --tokens 1 8 32
"""
import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_expert_weights  # noqa: E402
from cpu_bf16_widen import cpu_description  # noqa: E402

from tpmoe import ExpertSpec, ExpertWeights, routed_experts  # noqa: E402
from tpmoe.cli.report import format_table, write_json  # noqa: E402
from tpmoe.cli.timing import time_calls_interleaved  # noqa: E402
from tpmoe.cli.workload import random_routing, touched_bytes, touched_experts  # noqa: E402
from tpmoe.fp8 import quantize_fp8_experts  # noqa: E402
from tpmoe.mxfp4 import quantize_mxfp4_experts  # noqa: E402
from tpmoe.presets import get_preset  # noqa: E402


def read_floor(topk_ids, tensors):
    """A plain read of the touched experts' slices (experts 0..n-1, one contiguous pass per
    tensor), as 8-byte words through a max: the fastest plain reduction torch has here whatever
    the bytes hold (an int32 sum widens to int64 and runs several times slower; a float sum of
    fp8 bits would meet subnormals). The same read for both formats."""
    touched = touched_experts(topk_ids)
    slabs = [tensor.detach()[:touched].reshape(-1).view(torch.int64) for tensor in tensors]
    return lambda: [slab.max() for slab in slabs]


# The format each preset's checkpoints ship in, and the experts' spec.
FORMATS = {"qwen3-30b-a3b": ("fp8_block", ExpertSpec()), "mixtral-8x7b": ("fp8_block", ExpertSpec()),
           "gpt-oss-20b": ("mxfp4", ExpertSpec(activation="clamped_swiglu", layout="interleaved"))}


def quantize_fp8_by_expert(w_gate_up, w_down, block_size):
    """quantize_fp8_experts one expert at a time: its float temporaries of a whole model (Mixtral's
    experts are 2.8 GB in bf16) outgrew a 24 GiB machine."""
    parts = [quantize_fp8_experts(w_gate_up[e:e + 1], w_down[e:e + 1], block_size=block_size)
             for e in range(w_gate_up.shape[0])]
    first = parts[0]
    scales = first.scales._replace(gate_up=torch.cat([p.scales.gate_up for p in parts]),
                                   down=torch.cat([p.scales.down for p in parts]))
    return first._replace(w_gate_up=torch.cat([p.w_gate_up for p in parts]),
                          w_down=torch.cat([p.w_down for p in parts]), scales=scales)


def measure(name, config, num_tokens, dense, quantized, spec, args, generator):
    ids, topk_weights = random_routing(config, num_tokens, generator=generator)
    x = torch.randn(num_tokens, config.hidden_size, generator=generator).bfloat16()
    kind = quantized.format
    calls = {kind: lambda: routed_experts(x, quantized, ids, topk_weights, spec, backend="cpu"),
             "bf16": lambda: routed_experts(x, dense, ids, topk_weights, spec, backend="cpu"),
             f"floor_{kind}": read_floor(ids, [quantized.w_gate_up, quantized.w_down]),
             "floor_bf16": read_floor(ids, [dense.w_gate_up, dense.w_down])}
    with torch.no_grad():
        results = time_calls_interleaved(calls, warmup=args.warmup, repeats=args.repeats)
    best = {impl: result.min_s for impl, result in results.items()}
    stored_bytes = touched_bytes(ids, quantized.w_gate_up, quantized.w_down)
    rows = []
    for impl, result in results.items():
        row = dict(shape=name, T=num_tokens, impl=impl, ms=result.median_s * 1e3, ms_min=result.min_s * 1e3,
                   ms_max=max(result.samples_s) * 1e3)
        if impl == kind:
            row.update(x_floor=best[kind] / best[f"floor_{kind}"], vs_bf16=best["bf16"] / best[kind],
                       gbs=stored_bytes / best[kind] / 1e9)
        if impl == f"floor_{kind}":
            row["gbs"] = stored_bytes / best[impl] / 1e9
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=["qwen3-30b-a3b", "gpt-oss-20b"], choices=sorted(FORMATS))
    parser.add_argument("--tokens", type=int, nargs="*", default=[1, 8, 32, 512])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = [f"# {datetime.date.today()}  {cpu_description()}",
              f"# torch {torch.__version__}, {torch.get_num_threads()} threads, dequant kernels "
              f"{os.environ.get('TPMOE_CPU_DEQUANT_KERNEL', 'auto')}",
              f"# {' '.join([os.path.basename(sys.executable)] + sys.argv)}"]
    print("\n".join(header), flush=True)
    rows = []
    for name in args.presets:
        config = get_preset(name).config
        generator = torch.Generator().manual_seed(0)
        weights = make_expert_weights(config, torch.bfloat16, generator=generator)
        weight_format, spec = FORMATS[name]
        if config.layout == "gpt_oss":  # the packed checkpoint's orientation: rows are outputs
            weights = {key: value.transpose(1, 2).contiguous() for key, value in weights.items()
                       if key in ("w_gate_up", "w_down")}
        dense = ExpertWeights(weights["w_gate_up"], weights["w_down"])
        if weight_format == "mxfp4":
            quantized = quantize_mxfp4_experts(weights["w_gate_up"], weights["w_down"], layout=spec.layout)
        else:
            quantized = quantize_fp8_by_expert(weights["w_gate_up"], weights["w_down"], args.block_size)
        for num_tokens in args.tokens:
            rows += measure(name, config, num_tokens, dense, quantized, spec, args, generator)
            print(f"# done {name} T = {num_tokens}", file=sys.stderr, flush=True)
    columns = ["shape", "T", "impl", "ms", "ms_min", "ms_max", "gbs", "x_floor", "vs_bf16"]
    formats = {"ms": ".2f", "ms_min": ".2f", "ms_max": ".2f", "gbs": ".1f", "x_floor": ".2f", "vs_bf16": ".2f"}
    print(format_table(rows, columns, formats, markdown=True))
    if args.json:
        write_json(args.json, dict(header=header, rows=rows))


if __name__ == "__main__":
    main()
