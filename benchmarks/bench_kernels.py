"""The Triton expert kernels against their yardsticks at real model shapes, in one run (issues 3, 14).

For each preset (one MoE layer of a released model, tpmoe.presets; bf16) and token count T, the
forward ("fwd") and, with --backward, forward+backward ("fwd+bwd") of:
  tpmoe        tpmoe.triton.fused_experts_triton
  grouped_mm   torch._grouped_mm twice with the activation between (sort, gather, GEMM, act, GEMM,
               weight, unsort, sum): the same algorithm on PyTorch's grouped GEMM
  hf_grouped   transformers' experts module with experts_implementation="grouped_mm" (left out,
               with the reason in the notes, where transformers does not import)
  dense        one GEMM [T*K, H] x [H, 3I] of the same FLOPs (tpmoe.cli.workload.dense_step)
Per row: median ms (triton.testing.do_bench); TFLOP/s of the useful work (2*T*K*H*3I forward, 3x
that forward+backward; tpmoe's recompute of the gate/up pre-activation is not counted); of_dense,
the dense GEMM's time over this one's (1.0: the dense rate); of_peak, of a large bf16 matmul
measured once; hbm_gbps (forward), the bytes of the expert weights the routing touches over the
time: the bandwidth a decode step reaches, meaningful where the weights dominate (T <= 128); and
each implementation's max relative error against grouped_mm (output; dx for fwd+bwd). Per
(preset, T), the Triton config of every launch (tpmoe.triton.tile_configs.launch_configs). Prints
Markdown and writes JSON after every (preset, T), so that a run cut short keeps its rows. Exits 1
when an implementation disagrees with grouped_mm beyond AGREEMENT_EPS units of bf16 rounding.

--dry runs the same code on CPU under the Triton interpreter at shapes scaled by --scale (default
1/64) and T in {1, 16}: every implementation runs and is checked, nothing is timed (rows marked
dry). `make gpu-check` runs both (tools/gpu_check.py).

  python benchmarks/bench_kernels.py --backward                 # the three presets, T in 1..8192
  python benchmarks/bench_kernels.py --preset qwen3-30b-a3b --tokens 1 512 --json out.json
  python benchmarks/bench_kernels.py --dry --backward --json dry.json   # no GPU needed
  python benchmarks/bench_kernels.py --results-md benchmarks/NOTEBOOK.md  # append the dated table
"""
import argparse
import datetime
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import make_expert_weights, make_hf_experts  # noqa: E402

# None of these import tpmoe.triton (which must come after choose_device sets TRITON_INTERPRET).
from tpmoe.cli.report import format_table, write_json  # noqa: E402
from tpmoe.cli.workload import dense_step, random_routing, routed_expert_flops, touched_bytes  # noqa: E402
from tpmoe.presets import PRESETS, get_preset, scaled_config  # noqa: E402

DEFAULT_PRESETS = ("qwen3-30b-a3b", "gpt-oss-20b", "mixtral-8x7b")
DEFAULT_TOKENS = (1, 16, 128, 1024, 8192)
DRY_TOKENS = (1, 16)
DRY_SCALE = 1 / 64
DTYPE = torch.bfloat16
# tpmoe and grouped_mm round different intermediates to bf16 (grouped_mm its gate/up output and
# each pair's row, tpmoe only h), so they differ by a few units of bf16 rounding relative to the
# output's largest magnitude; a wrong expert or a dropped pair is off by O(1).
AGREEMENT_EPS = 8
ROW_COLUMNS = ["preset", "T", "pass_", "impl", "ms", "tflops", "of_dense", "of_peak", "hbm_gbps", "max_rel_err"]
ROW_FORMATS = {"ms": ".3f", "tflops": ".1f", "of_dense": ".2f", "of_peak": ".2f", "hbm_gbps": ".0f",
               "max_rel_err": ".1e"}


def choose_device(dry: bool) -> torch.device:
    """Where the kernels run; sets TRITON_INTERPRET for --dry (before tpmoe.triton is imported)."""
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"bench_kernels.py: needs a CUDA GPU, and torch.cuda.is_available() is False on this "
                         f"machine (torch {torch.__version__}); --dry runs the same code on CPU without timing it. "
                         f"The CPU path's benchmark is benchmarks/bench_cpu.py.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench_kernels.py: unset TRITON_INTERPRET: it makes the kernels run in the interpreter")
    return torch.device("cuda")


def make_measure(device: torch.device, warmup_ms: int, rep_ms: int):
    """The one timing helper: median ms of a step on the GPU, by triton's do_bench (CUDA events,
    the L2 cache cleared before every run: what tpmoe.cli.timing's host clock cannot do); under
    --dry, None (every step has run once already, checked; the interpreter's times say nothing
    about the kernels)."""
    if device.type != "cuda":
        return lambda step: None
    from triton.testing import do_bench
    return lambda step: do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def matmul_peak_tflops(measure, size=8192):
    a = torch.randn(size, size, device="cuda", dtype=DTYPE)
    b = torch.randn(size, size, device="cuda", dtype=DTYPE)
    return 2 * size ** 3 / (measure(lambda: a @ b) * 1e-3) / 1e12


def preset_shape(name: str, scale: float):
    """The preset's name, family, model and MoEConfig (scaled)."""
    preset = get_preset(name)
    config = scaled_config(preset.config, scale)
    if not config.gated:
        raise ValueError(f"preset: {name} has non-gated experts, which torch_grouped_mm_experts does not run")
    return dict(name=name, family=preset.family, model=preset.model, config=config)


def torch_grouped_mm_experts(x, weights, ids, topk_weights, config):
    """The same computation on torch._grouped_mm, for any layout of tpmoe.weights (with biases)."""
    from tpmoe.reference import gated_activation
    num_tokens, top_k = ids.shape
    flat_ids = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat_ids)
    offsets = torch.cumsum(torch.bincount(flat_ids, minlength=config.num_experts), 0).to(torch.int32)
    transposed = config.layout == "gpt_oss"  # stored [E, H, R] and [E, I, H]: already GEMM-ready
    w_gate_up, w_down = weights["w_gate_up"], weights["w_down"]
    gate_up = torch._grouped_mm(x[order // top_k], w_gate_up if transposed else w_gate_up.transpose(1, 2),
                                offs=offsets)
    if "b_gate_up" in weights:
        gate_up = gate_up + weights["b_gate_up"][sorted_ids]
    inter = gate_up.shape[1] // 2
    if config.layout == "concatenated":
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
    else:
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    h = gated_activation(config.activation, gate, up, config.swiglu_alpha, config.swiglu_limit).contiguous()
    out = torch._grouped_mm(h, w_down if transposed else w_down.transpose(1, 2), offs=offsets)
    if "b_down" in weights:
        out = out + weights["b_down"][sorted_ids]
    out = out * topk_weights.reshape(-1)[order, None].to(out.dtype)
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted.view(num_tokens, top_k, -1).float().sum(1).to(x.dtype)


def transformers_problem():
    """None when transformers imports, else why not (the hf_grouped rows are then left out)."""
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        return f"transformers does not import ({error})"
    return None


def expert_calls(shape, weights, ids):
    """impl -> (call(x, topk_weights) -> y, the parameters whose gradients a step clears)."""
    from tpmoe.triton import fused_experts_triton
    config = shape["config"]
    options = dict(activation=config.activation, layout=config.layout, gated=config.gated,
                   b_gate_up=weights.get("b_gate_up"), b_down=weights.get("b_down"), alpha=config.swiglu_alpha,
                   limit=config.swiglu_limit)
    parameters = list(weights.values())
    calls = {
        "tpmoe": (lambda x, tw: fused_experts_triton(x, weights["w_gate_up"], weights["w_down"], ids, tw, **options),
                  parameters),
        "grouped_mm": (lambda x, tw: torch_grouped_mm_experts(x, weights, ids, tw, config), parameters),
    }
    if transformers_problem() is None:
        hf = make_hf_experts(shape["family"], config, weights, "grouped_mm")
        calls["hf_grouped"] = (lambda x, tw: hf(x, ids, tw.to(x.dtype)), list(hf.parameters()))
    return calls


def forward_step(call, x, topk_weights):
    def step():
        with torch.no_grad():
            return call(x, topk_weights)
    return step


def train_step(call, parameters, x, topk_weights, dy):
    """(step, x leaf): one forward+backward with the gradients cleared first."""
    x = x.detach().requires_grad_(True)
    topk_weights = topk_weights.detach().requires_grad_(True)

    def step():
        for tensor in (x, topk_weights, *parameters):
            tensor.grad = None
        call(x, topk_weights).backward(dy)
    return step, x


def max_rel_error(actual, reference):
    reference = reference.float()
    return ((actual.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def describe_configs(shape, num_tokens, device):
    """The configs the timed launches ran with: the device's tables (sm_80 has its own, tile_configs)."""
    from tpmoe.triton.autograd import device_capability
    from tpmoe.triton.tile_configs import block_m_for, launch_configs, token_bucket
    c = shape["config"]
    configs = launch_configs(num_tokens, c.top_k, c.num_experts, c.hidden_size, c.intermediate_size, c.gate_up_rows,
                             torch.empty(0, dtype=DTYPE).element_size(), device_capability(device))
    bucket = token_bucket(num_tokens, c.top_k, c.num_experts)
    row = dict(preset=shape["name"], T=num_tokens, BLOCK_M=block_m_for(bucket))
    row.update({launch: f"{k.BLOCK_M}x{k.BLOCK_N}x{k.BLOCK_K} w{k.num_warps} s{k.num_stages}"
                for launch, k in configs.items()})
    return row


def first_run(impl, step, shape, num_tokens, notes):
    """step() once (it compiles the kernels; its result is checked). transformers' module may fail
    on a release or device it does not support: noted and left out, where the others must run."""
    try:
        return step()
    except Exception as error:
        if impl != "hf_grouped":
            raise
        notes.append(f"hf_grouped at {shape['name']} T={num_tokens}: failed "
                     f"({type(error).__name__}: {str(error).splitlines()[0][:160]})")
        return None


def bench_tokens(shape, weights, num_tokens, args, context):
    """The rows of one (preset, T), and the notes found on the way."""
    config, device, measure = shape["config"], context["device"], context["measure"]
    x = torch.randn(num_tokens, config.hidden_size, generator=context["generator"], device=device, dtype=DTYPE)
    ids, topk_weights = random_routing(config, num_tokens, generator=context["generator"], device=device)
    dy = torch.randn_like(x)
    flops = routed_expert_flops(config, num_tokens)
    weight_bytes = touched_bytes(ids, *weights.values())
    calls = expert_calls(shape, weights, ids)
    rows, notes = [], []
    for pass_name, mode, pass_flops in [("fwd", "fwd", flops)] + ([("fwd+bwd", "train", 3 * flops)]
                                                                  if args.backward else []):
        steps, results = {}, {}  # results: the output (fwd) or dx (fwd+bwd), compared with grouped_mm's
        for impl, (call, parameters) in calls.items():
            if mode == "fwd":
                step = forward_step(call, x, topk_weights)
                result = first_run(impl, step, shape, num_tokens, notes)
            else:
                step, x_leaf = train_step(call, parameters, x, topk_weights, dy)
                result = None if first_run(impl, lambda: step() or True, shape, num_tokens, notes) is None \
                    else x_leaf.grad
            if result is not None:
                steps[impl], results[impl] = step, result
        steps["dense"] = dense_step(config, num_tokens, flops, mode, DTYPE, device)
        steps["dense"]()
        timings = {impl: measure(step) for impl, step in steps.items()}
        for impl, ms in timings.items():
            row = dict(preset=shape["name"], T=num_tokens, pass_=pass_name, impl=impl, ms=ms, dry=ms is None,
                       max_rel_err=max_rel_error(results[impl], results["grouped_mm"])
                       if impl not in ("dense", "grouped_mm") else None)
            if ms is not None:
                tflops = pass_flops / (ms * 1e-3) / 1e12
                row.update(tflops=tflops, of_dense=timings["dense"] / ms,
                           of_peak=tflops / context["peak"] if context["peak"] else None,
                           hbm_gbps=weight_bytes / (ms * 1e-3) / 1e9 if mode == "fwd" else None)
            rows.append(row)
    return rows, notes


def markdown(payload) -> str:
    """The rows and the configs as Markdown tables, with the run's header and notes."""
    mode = "dry run on CPU (Triton interpreter; nothing timed)" if payload["mode"] == "dry" else payload["device"]
    lines = [f"bench_kernels.py, {payload['date']}, {mode}; torch {payload['torch']}, triton {payload['triton']}"
             + (f"; bf16 matmul peak {payload['matmul_peak_tflops']:.0f} TFLOP/s"
                if payload.get("matmul_peak_tflops") else ""), ""]
    lines += [format_table(payload["rows"], ROW_COLUMNS, ROW_FORMATS, markdown=True), "", "Triton configs (BLOCK_MxBLOCK_NxBLOCK_K, "
              "warps, stages) per launch:", ""]
    if payload["configs"]:
        lines.append(format_table(payload["configs"], list(payload["configs"][0]), markdown=True))
    lines += [""] + [f"- note: {note}" for note in payload["notes"]]
    lines += [f"- DISAGREES: {item}" for item in payload["disagreements"]]
    return "\n".join(lines).rstrip() + "\n"


def run(args) -> int:
    device = choose_device(args.dry)
    measure = make_measure(device, args.warmup, args.rep)
    import triton
    peak = matmul_peak_tflops(measure) if device.type == "cuda" else None
    payload = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   mode="dry" if args.dry else "gpu",
                   device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
                   torch=torch.__version__, triton=triton.__version__, matmul_peak_tflops=peak, scale=args.scale,
                   presets={}, rows=[], configs=[], notes=[], disagreements=[], complete=False)
    problem = transformers_problem()
    if problem:
        payload["notes"].append(f"hf_grouped: left out: {problem}")
    if peak:
        print(f"# {payload['device']}: measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    context = dict(device=device, measure=measure, peak=peak,
                   generator=torch.Generator(device=device).manual_seed(0))
    bound = AGREEMENT_EPS * torch.finfo(DTYPE).eps
    for name in args.preset:
        shape = preset_shape(name, args.scale)
        c = shape["config"]
        payload["presets"][name] = dict(model=shape["model"], H=c.hidden_size, I=c.intermediate_size, E=c.num_experts,
                                        K=c.top_k, layout=c.layout, activation=c.activation, bias=c.expert_bias)
        weights = make_expert_weights(c, DTYPE, device, context["generator"], requires_grad=True)
        for num_tokens in args.tokens:
            rows, notes = bench_tokens(shape, weights, num_tokens, args, context)
            payload["rows"] += rows
            payload["notes"] += notes
            payload["configs"].append(describe_configs(shape, num_tokens, device))
            payload["disagreements"] += [f"{row['impl']} {row['pass_']} at {name} T={num_tokens}: max relative error "
                                         f"{row['max_rel_err']:.2e} against grouped_mm > {bound:.2e}"
                                         for row in rows if (row["max_rel_err"] or 0) > bound]
            print(format_table(rows, ROW_COLUMNS, ROW_FORMATS, markdown=True), flush=True)
            write_json(args.json, payload)  # after every (preset, T): a run cut short keeps its rows
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    payload["complete"] = True
    write_json(args.json, payload)
    text = markdown(payload)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)
    if args.results_md:
        with open(args.results_md, "a") as handle:
            handle.write(f"\n## {text}")
    return 1 if payload["disagreements"] else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="*", default=list(DEFAULT_PRESETS), choices=list(PRESETS),
                        help="tpmoe.presets names (`tpmoe --list-presets`)")
    parser.add_argument("--tokens", type=int, nargs="*", default=None,
                        help=f"token counts (default {DEFAULT_TOKENS}; --dry: {DRY_TOKENS})")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    parser.add_argument("--dry", action="store_true", help="run on CPU under the Triton interpreter, untimed")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"hidden and intermediate sizes times this (default 1; --dry: {DRY_SCALE:g})")
    parser.add_argument("--json", default="bench_kernels.json")
    parser.add_argument("--markdown", default=None, help="also write the Markdown tables to this file")
    parser.add_argument("--results-md", default=None, help="append the dated table to this Markdown file")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = list(DRY_TOKENS if args.dry else DEFAULT_TOKENS)
    if args.scale is None:
        args.scale = DRY_SCALE if args.dry else 1.0
    if any(t < 1 for t in args.tokens):
        parser.error(f"--tokens: expected positive token counts, got {args.tokens}")
    return args


if __name__ == "__main__":
    sys.exit(run(parse_args()))
