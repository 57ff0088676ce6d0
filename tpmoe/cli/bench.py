"""`tpmoe bench`: one MoE block of a preset, timed per step at several token counts.

Implementations (--impl), all on the same weights and the same tokens:
  tpmoe          tpmoe.MoEBlock (router + experts + shared expert) at world sizes 1..P, tensor-
                 parallel; a step's time is its slowest rank's
  hf_eager       transformers' own block of the family, experts implementation "eager"   } world
  hf_grouped_mm  the same with "grouped_mm"                                              } size 1
  dense          per rank: one GEMM [T*K, H] x [H, N] with the FLOPs of the rank's share of the
                 block: the compute ceiling
  floor          per rank: a read of the rank's shard of as many experts as the routing touches
                 (plus the shared expert): the bandwidth floor; in train mode two reads and one write
(tpmoe.cli.workload). mode fwd: forward under torch.no_grad; train: forward + backward (weights
and input get grads). The implementations are timed interleaved, one run each per round, a run's
time being its slowest rank's (tpmoe.cli.timing), the yardsticks in the same rounds as the
contenders; the median of the rounds is reported, with min, max and quartiles, and flags for a
row whose spread is wide or that beats a yardstick (tpmoe.cli.spread).
fraction_of_limit = max(dense, floor) / median at the same world size and tokens: 1.0 would be
as fast as the better of the two yardsticks allows. gflops: the whole block's FLOPs per second.
World sizes run largest first, so that a rank whose part is over leaves and waits for nobody.
"""
import datetime
import math
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .._checks import dtype_name
from ..config import MoEConfig
from .machine import load_text, machine_text
from .report import first_line
from .spread import LEGEND, flag_cell, row_flags, spread_fields, stability_advice
from .timing import time_calls_interleaved
from .workload import block_forward_flops, dense_step, weight_read_step

IMPLS = ("tpmoe", "hf_eager", "hf_grouped_mm", "dense", "floor")
HF_IMPLS = {"hf_eager": "eager", "hf_grouped_mm": "grouped_mm"}
ROW_FIELDS = ("preset", "impl", "world_size", "tokens", "mode", "median_ms", "gflops", "fraction_of_limit",
              "min_ms", "max_ms", "q1_ms", "q3_ms", "samples", "flags")


@dataclass(frozen=True)
class BenchPlan:
    preset: str
    family: str
    config: MoEConfig
    scale: float
    world_size: int
    tokens: Tuple[int, ...]
    impls: Tuple[str, ...]
    mode: str
    dtype: torch.dtype
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    threads: Optional[int] = None  # CPU threads per rank; None: the cores shared out over the ranks
    device_type: str = "cpu"       # "cuda": one GPU per rank, NCCL, Triton kernels
    ep_size: int = 1               # > 1: `--ep E`, the layouts one process / TP P / EP E x TP P/E (tpmoe.cli.bench_ep)


# --------------------------------------------------------------------------- sizes

def step_flops(config: MoEConfig, num_tokens: int, mode: str) -> int:
    return block_forward_flops(config, num_tokens) * (3 if mode == "train" else 1)


def block_bytes(config: MoEConfig, dtype: torch.dtype) -> int:
    from ..weights import expected_shapes
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return sum(math.prod(shape) for shape in expected_shapes(config).values()) * itemsize


def available_bytes(device_type: str) -> Optional[int]:
    """Free memory for the weights: GPU 0's on CUDA, else MemAvailable (None if unknown)."""
    if device_type == "cuda":
        return torch.cuda.mem_get_info(0)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(plan: BenchPlan) -> None:
    """Raises UsageError (one line, with the --scale to try) when the block cannot fit."""
    needed = block_bytes(plan.config, plan.dtype) * (2 if plan.mode == "train" else 1)
    free = available_bytes(plan.device_type)
    if free is None or needed <= 0.7 * free:
        return
    scale = plan.scale
    while needed * (scale / plan.scale) ** 2 > 0.7 * free and scale > 1e-3:
        scale /= 2
    from .errors import UsageError
    raise UsageError(f"--scale: the {plan.preset} block needs {needed / 2**30:.1f} GiB at scale {plan.scale:g} "
                     f"({dtype_name(plan.dtype)}, {plan.mode}) but {free / 2**30:.1f} GiB are free; "
                     f"try --scale {scale:g}")


# --------------------------------------------------------------------------- weights and inputs

def make_shards(config: MoEConfig, rank: int, world_size: int, dtype: torch.dtype, device: torch.device,
                seed: int, *, ep_rank: int = 0, ep_size: int = 1) -> Dict[str, torch.Tensor]:
    """This rank's shard dict, drawn in place in `dtype` (no float64 copy of a full model): the
    replicated weights from `seed` (the same on every rank and world size, so the routing is
    too), the sharded ones per rank (their values do not change the work). ep_rank / ep_size:
    the shard of TP rank `rank` on that EP rank (tpmoe.sharding.shard_shapes)."""
    from ..sharding import SHARDED_NAMES, shard_shapes

    replicated = torch.Generator().manual_seed(seed)
    sharded = torch.Generator(device=device).manual_seed(seed + 1 + ep_rank * world_size + rank)
    fan_in = {"router_weight": config.hidden_size, "shared_gate": config.hidden_size,
              "w_gate_up": config.hidden_size, "shared_gate_up": config.hidden_size,
              "w_down": config.intermediate_size, "shared_down": max(1, config.shared_intermediate_size)}
    shards = {}
    for name, shape in shard_shapes(config, rank, world_size, ep_rank=ep_rank, ep_size=ep_size).items():
        std = 1 / math.sqrt(fan_in.get(name, 16))
        if name in SHARDED_NAMES:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            for slab in (tensor if tensor.dim() == 3 else [tensor]):  # per expert: no big temporaries
                slab.normal_(0.0, std, generator=sharded)
        else:
            tensor = (torch.randn(shape, generator=replicated) * std).to(dtype=dtype, device=device)
        shards[name] = tensor
    return shards


def make_tokens(config: MoEConfig, num_tokens: int, dtype, device, seed: int):
    generator = torch.Generator().manual_seed(seed * 1_000_003 + num_tokens)
    x = torch.randn(num_tokens, config.hidden_size, generator=generator)
    dy = torch.randn(num_tokens, config.hidden_size, generator=generator)
    return x.to(dtype=dtype, device=device), dy.to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- the steps

def _module_step(call, module, x, dy, mode):
    """One timed step of call(x): forward under no_grad, or forward+backward with module's
    gradients cleared first (call is the module itself for tpmoe, a wrapper for transformers)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return call(x)
        return step
    x_leaf = x.detach().clone().requires_grad_(True)

    def step():
        module.zero_grad(set_to_none=True)
        x_leaf.grad = None
        call(x_leaf).backward(dy)
    return step


# --------------------------------------------------------------------------- per rank

def bench_rank(context, plan: BenchPlan) -> List[Dict]:
    """Runs on every rank; rank 0 returns the rows (the timings are already the slowest rank's)."""
    import torch.distributed as dist

    from ..block import MoEBlock

    rank, device = context.rank, context.device
    world_sizes = list(range(plan.world_size, 0, -1))
    # Every rank creates every subgroup, in the same order, before any work.
    groups = {p: (context.group if p == context.world_size else
                  dist.new_group(list(range(p))) if p > 1 else None) for p in world_sizes} \
        if context.group is not None else {1: None}
    rows = []
    for world_size in world_sizes:
        if rank >= world_size:
            continue
        group = groups[world_size]
        if device.type == "cpu" and (plan.threads is not None or context.launcher != "torchrun"):
            torch.set_num_threads(plan.threads or max(1, (os.cpu_count() or 1) // world_size))
        shards = make_shards(plan.config, rank, world_size, plan.dtype, device, plan.seed)
        block = MoEBlock.from_shards(plan.config, shards, group=group, device=device)
        del shards
        hf_modules = {}
        if world_size == 1:
            hf_modules = _hf_modules(plan, block, context)
        for num_tokens in plan.tokens:
            rows += _bench_tokens(plan, block, hf_modules, world_size, group, num_tokens, context)
        del block, hf_modules
    return rows if rank == 0 else []


def _hf_modules(plan, block, context):
    """The HF comparison modules that can be built; each that cannot (any cause: transformers
    missing or of another release, a family it cannot express) is one note line, and the table
    keeps every other row."""
    from .hf_blocks import HFUnavailable, make_hf_block, untested_transformers
    modules = {}
    if not any(impl in plan.impls for impl in HF_IMPLS):
        return modules
    untested = untested_transformers()
    if untested:
        context.send(("note", untested))
    weights = block.local_shards()  # views of the block's parameters: no copy
    for impl, implementation in HF_IMPLS.items():
        if impl not in plan.impls:
            continue
        try:
            modules[impl] = make_hf_block(plan.family, plan.config, weights, implementation,
                                          trainable=plan.mode == "train")
        except HFUnavailable as error:
            context.send(("note", f"{impl}: skipped ({error})"))
        except Exception as error:  # noqa: BLE001 - a comparison row must never end the run
            context.send(("note", f"{impl}: skipped ({type(error).__name__}: {first_line(error)})"))
    return modules


def _bench_tokens(plan, block, hf_modules, world_size, group, num_tokens, context):
    config, device, mode = plan.config, context.device, plan.mode
    x, dy = make_tokens(config, num_tokens, plan.dtype, device, plan.seed)
    rank_fwd_flops = block_forward_flops(config, num_tokens, block.I_local, block.Is_local)
    total_flops = step_flops(config, num_tokens, mode)
    with torch.no_grad():
        _, _, topk_ids = block.route(x)  # the experts the floor must read

    steps = {"tpmoe": _module_step(block, block, x, dy, mode)}
    notes = {}
    for impl, (module, call) in hf_modules.items():
        step = _module_step(call, module, x, dy, mode)
        try:  # one untimed run first: an HF implementation this build cannot run (e.g. no grouped_mm kernel)
            step()
        except Exception as error:
            notes[impl] = f"{type(error).__name__}: {first_line(error)}"
            context.send(("note", f"{impl} at T={num_tokens}: failed ({notes[impl]})"))
            continue
        steps[impl] = step
    steps["dense"] = dense_step(config, num_tokens, rank_fwd_flops, mode, plan.dtype, device)
    shards = block.local_shards()  # this rank's tensors (its parameters' local views)
    steps["floor"] = weight_read_step(
        topk_ids, [shards[name] for name in ("w_gate_up", "b_gate_up", "w_down") if name in shards],
        mode, [shards[name] for name in ("shared_gate_up", "shared_down") if name in shards])

    # HF modules exist at world size 1 only, so every rank of the group times the same steps.
    # The yardsticks are among the steps: they sample the same moments of the machine as the contenders.
    timings = time_calls_interleaved(steps, warmup=plan.warmup, repeats=plan.repeats, device=device, group=group)
    medians = {impl: timing.median_ms for impl, timing in timings.items()}
    label = f"T={num_tokens} P={world_size}"
    for impl in list(steps) + list(notes):
        context.send(("progress", f"{impl} {label}"))

    differences = {}
    if hf_modules:
        # A sanity check that both sides compute the same block, as the median over tokens of
        # |theirs - ours| / |ours| per row: in bf16 a near-tie in the router can pick another
        # expert for a token on one side, which a maximum would report as a 100% difference.
        with torch.no_grad():
            ours = block(x).float()
            norms = ours.norm(dim=-1).clamp_min(1e-30)
            for impl, (module, call) in hf_modules.items():
                if impl in medians:
                    rows_diff = (call(x).float() - ours).norm(dim=-1) / norms
                    differences[impl] = rows_diff.median().item()

    limit_ms = max(medians["dense"], medians["floor"])
    rows = []
    for impl in IMPLS:
        if impl not in plan.impls or impl not in medians:
            continue
        ms = medians[impl]
        yardstick = impl in ("dense", "floor")
        row = dict(preset=plan.preset, impl=impl, world_size=world_size, tokens=num_tokens, mode=mode,
                   **spread_fields(timings[impl]),
                   flags=row_flags(timings[impl], None if yardstick else timings["dense"],
                                   None if yardstick else timings["floor"]),
                   gflops=total_flops / (ms * 1e-3) / 1e9,
                   fraction_of_limit=None if impl in ("dense", "floor") else limit_ms / ms,
                   limit_ms=limit_ms, dtype=dtype_name(plan.dtype), device=device.type,
                   threads=torch.get_num_threads() if device.type == "cpu" else None, scale=plan.scale)
        if impl in differences:
            row["median_row_diff_vs_tpmoe"] = differences[impl]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the command

class _Progress:
    """A tqdm bar when tqdm is installed, plain lines otherwise; notes are printed either way."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="tpmoe bench", unit="run", file=sys.stderr)
        except ImportError:
            self.bar = None
        self.total, self.done = total, 0

    def __call__(self, message):
        kind, text = message
        if kind == "note":
            (self.bar.write if self.bar is not None else lambda line: print(line, file=sys.stderr))(f"note: {text}")
            return
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


TABLE_COLUMNS = ["world_size", "tokens", "impl", "min_ms", "median_ms", "max_ms", "gflops", "fraction_of_limit",
                 "median_row_diff_vs_tpmoe", "flag"]
TABLE_FORMATS = dict(min_ms=".3f", median_ms=".3f", max_ms=".3f", gflops=".2f", fraction_of_limit=".2f",
                     median_row_diff_vs_tpmoe=".1e")
TABLE_HEADERS = dict(world_size="P", tokens="T", min_ms="min ms", median_ms="median ms", max_ms="max ms",
                     fraction_of_limit="of limit", median_row_diff_vs_tpmoe="diff vs tpmoe")


def describe(plan: BenchPlan) -> str:
    c = plan.config
    device = f"{plan.device_type} ({machine_text(plan.device_type)})"
    return (f"tpmoe bench: preset {plan.preset} (scale {plan.scale:g}: H={c.hidden_size} I={c.intermediate_size} "
            f"E={c.num_experts} K={c.top_k} shared={c.shared_intermediate_size}), mode {plan.mode}, "
            f"{dtype_name(plan.dtype)}, {device}, world sizes 1..{plan.world_size}, "
            f"median of {plan.repeats} interleaved rounds"
            + (f", {plan.threads} thread{'s' if plan.threads != 1 else ''} per rank"
               if plan.threads and plan.device_type == "cpu" else "")
            + (f"; {load_text()} at the start" if plan.device_type == "cpu" and load_text() else "")
            + f"; torch {torch.__version__}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def check_before_running(plan: BenchPlan, plot_path: Optional[str]) -> None:
    """What can be said before the long part (one line, UsageError): the block does not fit, or a
    plot was asked for and matplotlib is missing. Both benches (this one and tpmoe.cli.bench_ep)
    call it first."""
    check_fits(plan)
    if plot_path is not None:
        from .plot import check_plotting
        check_plotting()


def run_bench(plan: BenchPlan, *, json_path: Optional[str], plot_path: Optional[str], timeout_s: int, out) -> int:
    from .launch import is_main_process, run_ranks
    from .report import format_table, write_json

    check_before_running(plan, plot_path)
    main = is_main_process()
    measured = 3 + sum(1 for impl in HF_IMPLS if impl in plan.impls)  # tpmoe, dense, floor (+ HF at P=1)
    total = len(plan.tokens) * (3 * plan.world_size + measured - 3)
    progress = _Progress(total) if main else None
    try:
        per_rank = run_ranks(bench_rank, plan, plan.world_size, on_message=progress, timeout_s=timeout_s,
                             gather=False, device_type=plan.device_type)
    finally:
        if progress is not None:
            progress.close()
    if not main:
        return 0
    rows = sorted(per_rank[0], key=lambda row: (row["tokens"], row["world_size"], IMPLS.index(row["impl"])))
    header = describe(plan)
    print(header, file=out)
    table_rows = [dict(row, flag=flag_cell(row)) for row in rows]
    print(format_table(table_rows, TABLE_COLUMNS, TABLE_FORMATS, TABLE_HEADERS), file=out)
    print("of limit: max(dense ceiling, weight-read floor) / median (1.0 = at the yardstick); "
          "gflops: the whole block's FLOPs per second;\ndiff vs tpmoe: median over tokens of |theirs - ours| / |ours|; "
          + LEGEND, file=out)
    if json_path is not None:
        write_json(json_path, dict(header=header, fields=list(ROW_FIELDS), rows=rows))
        print(f"JSON: {os.path.abspath(json_path)}", file=out)
    if plot_path is not None:
        from .plot import plot_rows
        os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
        plot_rows(rows, plot_path, subtitle=f"{machine_text(plan.device_type)}; {load_text()} at the end"
                  if plan.device_type == "cpu" else machine_text(plan.device_type))
        print(f"plot: {os.path.abspath(plot_path)}", file=out)
    advice = stability_advice(rows)
    if advice is not None:
        print(advice, file=out)
    out.flush()
    return 0

