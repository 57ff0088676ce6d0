"""`tpmoe bench --ep E --world-size P`: one MoE block of a preset in three layouts, timed
interleaved on the same P ranks, with the bytes of every collective counted.

  one process   the whole block on rank 0, over all T tokens (the other ranks wait)
  tp P          tensor parallel over the P ranks, the T tokens replicated on each
  ep E [x tp]   expert parallel: E EP ranks of P / E TP ranks ("ep", "tp") DeviceMesh); EP rank
                e holds its share of the T tokens (tpmoe.cli.verify.token_split), its TP ranks
                the same ones; in train mode the step ends with allreduce_router_grads (the
                per-step EP sum of the replicated gradients, part of EP's cost)

The same global batch of T tokens in every layout, and the same routing (the replicated weights
come from one seed; tpmoe.cli.bench.make_shards). One round times each layout once (the order
reversed every other round), a sample being its slowest rank's time (tpmoe.cli.timing); the
median is reported with min, max and quartiles, a row with a wide spread flagged
(tpmoe.cli.spread), and its ratio to the one-process and TP medians.

Bytes: one more step of each layout runs under tpmoe.distributed.counting.CollectiveCounter,
which records the bytes of the tensor each rank hands to each collective (all_to_all_single:
every row it sends, its own included; all_reduce: the reduced tensor), summed over the P ranks.
The formula beside it (docs/design.md section 2): forward, the dispatch and the combine each
move K * T * H elements over an EP group (+ E int64 counts per rank), x P / E TP replicas;
TP's all-reduce takes T * H elements on every rank forward and T * (H + K [+ 1 with a shared
gate]) backward (dx packed with the routing weights' gradient, in their promoted dtype); EP x
TP's the received rows (K * T over an EP group) plus the shared expert's T rows each way; train
doubles the exchanges (the backward mirrors each) and adds the per-step all-reduce of the
replicated gradients. On CPU (gloo) this shows
correctness of the plumbing and the byte counts, not the speed of a network.
"""
import os
import sys
from typing import Dict, List, Optional

import torch

from .._checks import dtype_name
from .spread import WIDE_IQR, WIDE_MAX_OVER_MIN, flag_cell, row_flags, spread_fields, stability_advice
from .timing import time_calls_interleaved

NAMES = ("all_to_all_single", "all_reduce")
TABLE_COLUMNS = ["tokens", "layout", "min_ms", "median_ms", "max_ms", "ratio_vs_one_process", "ratio_vs_tp",
                 "all_to_all_bytes", "all_to_all_formula", "all_reduce_bytes", "all_reduce_formula", "flag"]
TABLE_FORMATS = dict(min_ms=".3f", median_ms=".3f", max_ms=".3f", ratio_vs_one_process=".2f", ratio_vs_tp=".2f", all_to_all_bytes=",",
                     all_to_all_formula=",", all_reduce_bytes=",", all_reduce_formula=",")
TABLE_HEADERS = dict(tokens="T", min_ms="min ms", median_ms="median ms", max_ms="max ms", ratio_vs_one_process="vs P=1", ratio_vs_tp="vs tp",
                     all_to_all_bytes="all_to_all B", all_to_all_formula="(formula)", all_reduce_bytes="all_reduce B",
                     all_reduce_formula="(formula)")


def layout_names(world_size: int, ep_size: int) -> Dict[str, str]:
    tp_size = world_size // ep_size
    return {"one": "one process", "tp": f"tp {world_size}",
            "ep": f"ep {ep_size}" + (f" x tp {tp_size}" if tp_size > 1 else "")}


def formula_bytes(config, num_tokens: int, world_size: int, ep_size: int, mode: str, itemsize: int,
                  weights_itemsize: int, summed_bytes: int) -> Dict[str, Dict[str, int]]:
    """{layout: {collective: bytes summed over the ranks}} from the sizes alone (module docstring).
    itemsize: the block's dtype's; weights_itemsize: the routing weights' (TP's backward all-reduce
    packs [dx | d topk_weights | d shared gate] in their promoted dtype); summed_bytes: one rank's
    bytes of the EP block's replicated gradients (train's per-step sum)."""
    tp_size = world_size // ep_size
    train = mode == "train"
    k, h, t = config.top_k, config.hidden_size, num_tokens
    gate = 1 if config.shared_expert_gate else 0
    shared = config.shared_intermediate_size > 0
    rows = k * t * h * itemsize  # one direction of one exchange, over an EP group
    counts = config.num_experts * 8 * world_size
    ep = {"all_to_all_single": tp_size * 2 * rows * (2 if train else 1) + counts}
    reduce_bytes = 0
    if tp_size > 1:
        # Forward g: [received rows | shared rows]; backward f: [d rows | d shared input | d shared gate].
        region = rows + (t * h * itemsize if shared else 0)
        reduce_bytes += tp_size * region
        if train:
            reduce_bytes += tp_size * (region + t * gate * itemsize)
    if train:
        reduce_bytes += world_size * summed_bytes
    if reduce_bytes:
        ep["all_reduce"] = reduce_bytes
    backward_itemsize = max(itemsize, weights_itemsize)
    tp = world_size * t * h * itemsize + (world_size * t * (h + k + gate) * backward_itemsize if train else 0)
    return {"one": {}, "tp": {"all_reduce": tp}, "ep": ep}


def _step(block, x, dy, mode, after_backward=None):
    """fwd: forward under no_grad; train: forward + backward (+ after_backward), grads cleared first."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return block(x)
        return step
    x_leaf = x.detach().clone().requires_grad_(True)

    def step():
        block.zero_grad(set_to_none=True)
        x_leaf.grad = None
        block(x_leaf).backward(dy)
        if after_backward is not None:
            after_backward()
    return step


def _counted(step, group, device) -> Dict[str, Dict[str, int]]:
    """One run of step(): {"bytes": {name: bytes summed over the ranks}, "calls": {name: calls on each rank}}."""
    import torch.distributed as dist

    from ..distributed.counting import CollectiveCounter

    with CollectiveCounter() as counter:
        step()
    moved, calls = counter.take_bytes(), counter.take()
    local = torch.tensor([moved[name] for name in NAMES], dtype=torch.int64, device=device)
    dist.all_reduce(local, group=group)
    return {"bytes": {name: int(value) for name, value in zip(NAMES, local.tolist()) if value},
            "calls": {name: calls[name] for name in NAMES if calls[name]}}


def bench_ep_rank(context, plan) -> List[Dict]:
    """Runs on every rank; rank 0 returns the rows (timings are already the slowest rank's)."""
    from torch.distributed.device_mesh import init_device_mesh

    from ..block import MoEBlock
    from ..distributed import allreduce_router_grads
    from .bench import make_shards, make_tokens
    from .verify import token_split

    config, device, mode = plan.config, context.device, plan.mode
    rank, world_size, ep_size = context.rank, context.world_size, plan.ep_size
    tp_size = world_size // ep_size
    ep_rank, tp_rank = divmod(rank, tp_size)  # the ("ep", "tp") mesh is row-major
    if device.type == "cpu" and (plan.threads is not None or context.launcher != "torchrun"):
        torch.set_num_threads(plan.threads or max(1, (os.cpu_count() or 1) // world_size))
    if tp_size > 1:
        mesh = init_device_mesh(device.type, (ep_size, tp_size), mesh_dim_names=("ep", "tp"))
    else:
        mesh = init_device_mesh(device.type, (ep_size,), mesh_dim_names=("ep",))
    options = dict(dtype=plan.dtype, device=device, seed=plan.seed)
    one = MoEBlock.from_shards(config, make_shards(config, 0, 1, **options), device=device) if rank == 0 else None
    tp_block = MoEBlock.from_shards(config, make_shards(config, rank, world_size, **options), group=context.group,
                                    device=device)
    ep_block = MoEBlock.from_shards(config, make_shards(config, tp_rank, tp_size, ep_rank=ep_rank, ep_size=ep_size,
                                                        **options),
                                    mesh, ep_mesh_dim="ep", tp_mesh_dim="tp" if tp_size > 1 else None, device=device)
    itemsize = torch.empty(0, dtype=plan.dtype).element_size()
    summed_bytes = sum(p.numel() * p.element_size() for p in ep_block.expert_parallel_summed_parameters())
    names = layout_names(world_size, ep_size)
    rows = []
    for num_tokens in plan.tokens:
        x, dy = make_tokens(config, num_tokens, plan.dtype, device, plan.seed)
        counts = token_split(num_tokens, ep_size)
        first = sum(counts[:ep_rank])
        mine = slice(first, first + counts[ep_rank])
        steps = {
            "one": _step(one, x, dy, mode) if one is not None else (lambda: None),
            "tp": _step(tp_block, x, dy, mode),
            "ep": _step(ep_block, x[mine], dy[mine], mode,
                        after_backward=lambda: allreduce_router_grads(ep_block)),
        }
        timings = time_calls_interleaved(steps, warmup=plan.warmup, repeats=plan.repeats, device=device,
                                         group=context.group)
        counted = {layout: _counted(step, context.group, device) for layout, step in steps.items()}
        with torch.no_grad():
            weights_itemsize = tp_block.route(x[:1])[1].element_size()
        formula = formula_bytes(config, num_tokens, world_size, ep_size, mode, itemsize, weights_itemsize,
                                summed_bytes)
        medians = {layout: timing.median_ms for layout, timing in timings.items()}
        for layout in steps:
            measured = counted[layout]["bytes"]
            rows.append(dict(
                preset=plan.preset, layout=names[layout], world_size=1 if layout == "one" else world_size,
                ep_size=ep_size if layout == "ep" else 1,
                tp_size=tp_size if layout == "ep" else (world_size if layout == "tp" else 1), tokens=num_tokens,
                mode=mode, **spread_fields(timings[layout]), flags=row_flags(timings[layout]),
                ratio_vs_one_process=medians[layout] / medians["one"],
                ratio_vs_tp=medians[layout] / medians["tp"], bytes_per_collective=measured,
                formula_bytes_per_collective=formula[layout], calls_per_rank=counted[layout]["calls"],
                all_to_all_bytes=measured.get("all_to_all_single"),
                all_to_all_formula=formula[layout].get("all_to_all_single"),
                all_reduce_bytes=measured.get("all_reduce"), all_reduce_formula=formula[layout].get("all_reduce"),
                dtype=dtype_name(plan.dtype), device=device.type,
                threads=torch.get_num_threads() if device.type == "cpu" else None, scale=plan.scale))
        context.send(("progress", f"T={num_tokens}"))
    return rows if rank == 0 else []


def run_bench_ep(plan, *, json_path: Optional[str], plot_path: Optional[str] = None, timeout_s: int, out) -> int:
    from .bench import check_before_running, describe
    from .launch import is_main_process, run_ranks
    from .report import format_table, write_json

    check_before_running(plan, plot_path)

    def progress(message):
        kind, text = message
        print(f"{kind}: {text}", file=sys.stderr, flush=True)

    per_rank = run_ranks(bench_ep_rank, plan, plan.world_size, on_message=progress, timeout_s=timeout_s,
                         gather=False, device_type=plan.device_type)
    if not is_main_process():
        return 0
    rows = per_rank[0]
    names = layout_names(plan.world_size, plan.ep_size)
    header = describe(plan).replace(f"world sizes 1..{plan.world_size}",
                                    f"layouts {', '.join(names.values())} on {plan.world_size} ranks")
    print(header, file=out)
    print(format_table([dict(row, flag=flag_cell(row)) for row in rows], TABLE_COLUMNS, TABLE_FORMATS,
                       TABLE_HEADERS), file=out)
    print("vs P=1 / vs tp: median / the one-process / the TP median (below 1: faster); bytes: the tensors handed "
          "to each collective per step,\nsummed over the ranks (all_to_all: the counts, dispatch and combine; "
          "all_reduce: TP's reduction, and in train the per-step EP sum); (formula): the same from the sizes;\n"
          f"flag wide: IQR > {WIDE_IQR:.0%} of the median or max > {WIDE_MAX_OVER_MIN:g}x min", file=out)
    if json_path is not None:
        write_json(json_path, dict(header=header, rows=rows))
        print(f"JSON: {os.path.abspath(json_path)}", file=out)
    if plot_path is not None:
        from .machine import load_text, machine_text
        from .plot import plot_ep_rows
        os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
        machine = machine_text(plan.device_type)
        plot_ep_rows(rows, plot_path, subtitle=f"{machine}; {load_text()} at the end" if plan.device_type == "cpu"
                     else machine)
        print(f"plot: {os.path.abspath(plot_path)}", file=out)
    advice = stability_advice(rows)
    if advice is not None:
        print(advice, file=out)
    out.flush()
    return 0
