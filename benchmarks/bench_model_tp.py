"""Whole-model tokens per second at tensor-parallel world size 2: transformers' own TP
(`from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"))`, its "grouped_mm"
experts; from transformers 5.25 its plan leaves most families' routed experts whole on every rank) against the same loaded model
after `tpmoe.hf.apply(model)` takes over its MoE blocks (attention stays as transformers
sharded it). The model is bench_model.py's (a family's MoE shapes scaled, random weights),
saved once to a temporary folder and loaded by each rank.

    python benchmarks/bench_model_tp.py --family qwen3_moe --prompt 128 --new 32 --threads 1 --repeats 5

Ranks: spawned with gloo on CPU (tpmoe.cli.launch.run_ranks), each with --threads threads.
Timing and MoE share as bench_model.py (interleaved rounds, prefill then N greedy decode steps;
the share is rank 0's), the ranks lined up before every sample and a sample being the SLOWEST
rank's time (the ranks wait for each other at the next all-reduce anyway).
"""
import datetime
import os
import sys
import tempfile
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model  # noqa: E402

VARIANTS = ("hf_tp_grouped_mm", "tpmoe_tp")


def _load(path: str, dtype: torch.dtype, variant: str):
    import tpmoe.hf
    from transformers import AutoModelForCausalLM, DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 distributed_config=DistributedConfig(tp_plan="auto"),
                                                 experts_implementation="grouped_mm").eval()
    if variant == "tpmoe_tp":
        tpmoe.hf.apply(model)  # no group: the TP mesh transformers loaded the model on
    return model


def rank_worker(context, payload) -> List[Dict]:
    import torch.distributed as dist

    path, args = payload
    # What torchrun would have set: transformers derives the "auto" plan's TP size from it.
    os.environ.update(WORLD_SIZE=str(context.world_size), RANK=str(context.rank), LOCAL_RANK=str(context.rank))
    torch.set_num_threads(args.threads or 1)
    dtype = getattr(torch, args.dtype)
    models = {variant: _load(path, dtype, variant) for variant in VARIANTS}
    vocab = models[VARIANTS[0]].config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    decoded = {}
    for variant, model in models.items():
        for _ in range(max(1, args.warmup)):
            decoded[variant] = bench_model.generate(model, prompt, args.new)[2]
    samples = {variant: [] for variant in VARIANTS}
    for round_index in range(args.repeats):
        for variant in (VARIANTS if round_index % 2 == 0 else reversed(VARIANTS)):
            dist.barrier(group=context.group)
            prefill_s, decode_s, _ = bench_model.generate(models[variant], prompt, args.new)
            samples[variant].append((prefill_s, decode_s))
    # Every rank runs the hooked generate (its collectives need all of them); rank 0's share is reported.
    shares = {variant: bench_model.moe_share(models[variant], prompt, args.new) for variant in VARIANTS}
    slowest = torch.tensor([samples[variant] for variant in VARIANTS], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=context.group)
    if context.rank != 0:
        return []
    timings = {variant: [bench_model._timing(slowest[index, :, phase].tolist()) for phase in (0, 1)]
               for index, variant in enumerate(VARIANTS)}
    rows = []
    for variant in VARIANTS:
        for phase_index, (phase, tokens) in enumerate((("prefill", args.prompt), ("decode", args.new))):
            timing = timings[variant][phase_index]
            reference = timings[VARIANTS[0]][phase_index]
            rows.append(dict(variant=variant, phase=phase, tokens=tokens, world_size=context.world_size,
                             **bench_model.spread_fields(timing), flags=bench_model.row_flags(timing),
                             tokens_per_s=tokens / timing.median_s,
                             speedup_vs_hf_tp=reference.median_s / timing.median_s, moe_share=shares[variant],
                             same_tokens_as_hf_tp=bool(torch.equal(decoded[variant], decoded[VARIANTS[0]])),
                             family=args.family, hidden=models[variant].config.hidden_size, layers=args.layers,
                             dtype=args.dtype, threads=torch.get_num_threads()))
    return rows


COLUMNS = ["phase", "tokens", "variant", "min_ms", "median_ms", "max_ms", "tokens_per_s", "speedup_vs_hf_tp",
           "moe_share", "same_tokens_as_hf_tp", "flag"]
HEADERS = dict(bench_model.HEADERS, speedup_vs_hf_tp="vs hf tp", same_tokens_as_hf_tp="same tokens")


def main(argv=None, out=sys.stdout) -> List[Dict]:
    from tpmoe.cli.launch import run_ranks
    from tpmoe.cli.machine import load_text, machine_text
    from tpmoe.cli.report import format_table

    parser_args = bench_model.parse_args(argv)
    config, model_class = bench_model.model_config(parser_args.family, parser_args.scale, parser_args.layers,
                                                   parser_args.vocab)
    # transformers' TP splits attention by heads: query and key-value heads must divide by 2 (the
    # one-process bench_model.py keeps one KV head at H = 512, so these models have one more).
    if config.num_attention_heads % 2:
        raise SystemExit(f"--scale: {config.num_attention_heads} attention heads do not split over 2 ranks; "
                         "pick a scale giving a hidden size of a multiple of 128")
    config.num_key_value_heads = max(2, config.num_key_value_heads)
    with tempfile.TemporaryDirectory() as path:
        base = bench_model.build_models(config, model_class, getattr(torch, parser_args.dtype), parser_args.seed,
                                        variants=("eager",))["eager"]
        base.save_pretrained(path)
        del base
        rows = run_ranks(rank_worker, (path, parser_args), 2, gather=False, device_type="cpu")[0]
    header = (f"bench_model_tp: {parser_args.family} ({bench_model.FAMILIES[parser_args.family][0]} scaled by "
              f"{parser_args.scale:g}: H={config.hidden_size}, {config.num_attention_heads} / "
              f"{config.num_key_value_heads} heads, {parser_args.layers} layers) at TP 2 (gloo, {rows[0]['threads']} "
              f"thread(s) per rank), {parser_args.dtype}, prefill T={parser_args.prompt}, decode N={parser_args.new}, "
              f"median of {parser_args.repeats} interleaved rounds; {machine_text('cpu')}; {load_text()}; "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(header, file=out)
    print(format_table([dict(row, flag=bench_model.flag_cell(row)) for row in rows], COLUMNS,
                       dict(bench_model.FORMATS, speedup_vs_hf_tp=".2f"), HEADERS), file=out)
    if parser_args.json:
        import json
        os.makedirs(os.path.dirname(os.path.abspath(parser_args.json)), exist_ok=True)
        with open(parser_args.json, "w") as handle:
            json.dump(dict(header=header, argv=sys.argv if argv is None else argv, rows=rows), handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
