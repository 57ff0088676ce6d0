"""Whole-model tokens per second: a small MoE causal LM built from a config (random weights, no
download), timed for prefill (T prompt tokens) and decode (N new tokens, greedy, KV cache), with
tpmoe applied (`tpmoe.hf.apply`) against the same model with transformers' "eager" and
"grouped_mm" experts. Users judge tokens per second, not one block.

    python benchmarks/bench_model.py --family qwen3_moe --prompt 128 --new 32 --threads 1 --repeats 10 --json out.json

Sizes: --family picks the MoE shapes of Qwen3-30B-A3B (qwen3_moe), Mixtral-8x7B (mixtral) or
GPT-OSS-20B (gpt_oss), scaled by --scale (default 1/4; Qwen3: H = 512, I = 192, E = 128,
K = 8), --layers decoder layers (default 4), a 4096-token vocabulary (the real 151,936 would
make the LM head dominate a 4-layer model). One process; at TP world size 2 against
transformers' own TP (its "auto" plan): benchmarks/bench_model_tp.py.

Timing: one round runs every variant once (prefill, then N decode steps on its cache), the order
reversed every other round, as tpmoe.cli.timing does for the block bench; the median of the
rounds is reported with min and max (tpmoe.cli.spread). MoE share: the time inside the MoE
blocks (forward hooks on every layer's `.mlp`, every layer's MLP being MoE in these families) over the step's, from one
extra untimed-by-the-table run per variant. The variants decode the same tokens (checked: in
float32 exactly; in bf16 a router near-tie may differ, which is reported, not failed).
"""
import argparse
import copy
import datetime
import inspect
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

from tpmoe.cli.machine import load_text, machine_text
from tpmoe.cli.report import format_table
from tpmoe.cli.spread import flag_cell, row_flags, spread_fields
from tpmoe.cli.timing import Timing

VARIANTS = ("eager", "grouped_mm", "tpmoe")


# Per family: the real model whose MoE shapes are scaled, and those shapes (H, I, E, K).
FAMILIES = {
    "qwen3_moe": ("Qwen3-30B-A3B", dict(hidden=2048, intermediate=768, experts=128, top_k=8)),
    "mixtral": ("Mixtral-8x7B", dict(hidden=4096, intermediate=14336, experts=8, top_k=2)),
    "gpt_oss": ("GPT-OSS-20B", dict(hidden=2880, intermediate=2880, experts=32, top_k=4)),
}


def model_config(family: str, scale: float, layers: int, vocab: int = 4096):
    """(transformers config, causal LM class) of `family` with FAMILIES' shapes scaled by `scale`
    (hidden and expert sizes; attention heads of head_dim 64, 8 query heads per KV head)."""
    import transformers

    shapes = FAMILIES[family][1]
    hidden = max(64, int(shapes["hidden"] * scale) // 64 * 64)
    # A multiple of 8 elements: torch._grouped_mm wants 16-byte strides (bf16), as real models have.
    intermediate = max(8, int(shapes["intermediate"] * scale) // 8 * 8)
    heads = hidden // 64
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // 8), head_dim=64, vocab_size=vocab, max_position_embeddings=4096,
                  num_experts_per_tok=shapes["top_k"])
    if family == "qwen3_moe":
        return (transformers.Qwen3MoeConfig(intermediate_size=3 * hidden, moe_intermediate_size=intermediate,
                                            num_experts=shapes["experts"], norm_topk_prob=True, **common),
                transformers.Qwen3MoeForCausalLM)
    if family == "mixtral":
        return (transformers.MixtralConfig(intermediate_size=intermediate, num_local_experts=shapes["experts"], **common),
                transformers.MixtralForCausalLM)
    return (transformers.GptOssConfig(intermediate_size=intermediate, num_local_experts=shapes["experts"], **common),
            transformers.GptOssForCausalLM)


def build_models(config, model_class, dtype: torch.dtype, seed: int,
                 variants=VARIANTS) -> Dict[str, torch.nn.Module]:
    """{variant: model} for each of `variants`, every one with the same weights."""
    import tpmoe.hf

    torch.manual_seed(seed)
    base = model_class(config).to(dtype).eval()
    with torch.no_grad():  # HF may start routers at zeros (every expert ties); random ones route like a trained model
        for name, parameter in base.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                parameter.normal_(0.0, config.hidden_size ** -0.5)
    models = {}
    for variant in variants:
        model = copy.deepcopy(base)
        if variant == "tpmoe":
            tpmoe.hf.apply(model)
        else:
            model.set_experts_implementation(variant)
        models[variant] = model
    return models


def _cache_name(model) -> str:
    """The forward's KV-cache argument and output field: "cache" in transformers 5.24 on,
    "past_key_values" before (deprecated since)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(model, prompt: torch.Tensor, new_tokens: int):
    """(prefill seconds, decode seconds, the N new token ids): greedy, with a KV cache."""
    name = _cache_name(model)
    with torch.no_grad():
        begin = time.perf_counter()
        out = model(prompt, use_cache=True)
        prefilled = time.perf_counter()
        cache, tokens = getattr(out, name), []
        next_id = out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            tokens.append(next_id)
            out = model(next_id, use_cache=True, **{name: cache})
            next_id = out.logits[:, -1:].argmax(-1)
        done = time.perf_counter()
    return prefilled - begin, done - prefilled, torch.cat(tokens, dim=1)


def moe_share(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Fraction of one generate()'s time spent inside the layers' `.mlp` (the MoE blocks)."""
    spent, started = [0.0], {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            handles.append(module.register_forward_pre_hook(
                lambda m, args: started.__setitem__(id(m), time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, args, out: spent.__setitem__(0, spent[0] + time.perf_counter() - started[id(m)])))
    try:
        prefill_s, decode_s, _ = generate(model, prompt, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return spent[0] / (prefill_s + decode_s)


def _timing(samples: List[float]) -> Timing:
    return Timing(statistics.median(samples), min(samples), len(samples), samples)


def bench(args) -> List[Dict]:
    dtype = getattr(torch, args.dtype)
    config, model_class = model_config(args.family, args.scale, args.layers, args.vocab)
    models = build_models(config, model_class, dtype, args.seed)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    decoded = {}
    for variant, model in list(models.items()):  # warm-up, and the tokens each decodes
        try:
            for _ in range(max(1, args.warmup)):
                decoded[variant] = generate(model, prompt, args.new)[2]
        except RuntimeError as error:  # e.g. a grouped_mm this torch build lacks: said, not fatal
            if variant == "eager":
                raise
            print(f"note: {variant} skipped ({str(error).splitlines()[0][:120]})", file=sys.stderr)
            del models[variant]
    samples = {variant: ([], []) for variant in models}
    names = list(models)
    for round_index in range(args.repeats):
        for variant in (names if round_index % 2 == 0 else reversed(names)):
            prefill_s, decode_s, _ = generate(models[variant], prompt, args.new)
            samples[variant][0].append(prefill_s)
            samples[variant][1].append(decode_s)
    shares = {variant: moe_share(model, prompt, args.new) for variant, model in models.items()}
    prefill = {variant: _timing(samples[variant][0]) for variant in names}
    decode = {variant: _timing(samples[variant][1]) for variant in names}
    rows = []
    for variant in names:
        for phase, timings, tokens in (("prefill", prefill, args.prompt), ("decode", decode, args.new)):
            timing = timings[variant]
            rows.append(dict(variant=variant, phase=phase, tokens=tokens, **spread_fields(timing),
                             flags=row_flags(timing), tokens_per_s=tokens / timing.median_s,
                             speedup_vs_eager=timings["eager"].median_s / timing.median_s, moe_share=shares[variant],
                             same_tokens_as_eager=bool(torch.equal(decoded[variant], decoded["eager"])),
                             family=args.family, hidden=config.hidden_size,
                             moe_intermediate=getattr(config, "moe_intermediate_size", config.intermediate_size),
                             experts=getattr(config, "num_experts", None) or config.num_local_experts,
                             top_k=config.num_experts_per_tok, layers=args.layers,
                             dtype=args.dtype, threads=torch.get_num_threads()))
    return rows


COLUMNS = ["phase", "tokens", "variant", "min_ms", "median_ms", "max_ms", "tokens_per_s", "speedup_vs_eager",
           "moe_share", "same_tokens_as_eager", "flag"]
FORMATS = dict(min_ms=".2f", median_ms=".2f", max_ms=".2f", tokens_per_s=".1f", speedup_vs_eager=".2f",
               moe_share=".2f")
HEADERS = dict(tokens="T / N", min_ms="min ms", median_ms="median ms", max_ms="max ms", tokens_per_s="tok/s",
               speedup_vs_eager="vs eager", moe_share="MoE share", same_tokens_as_eager="same tokens")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128, help="prefill tokens T")
    parser.add_argument("--new", type=int, default=32, help="decode tokens N")
    parser.add_argument("--family", default="qwen3_moe", choices=list(FAMILIES),
                        help="the shapes of " + ", ".join(f"{f}: {m}" for f, (m, _) in FAMILIES.items()))
    parser.add_argument("--scale", type=float, default=0.25, help="the family's hidden/expert sizes times F")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv=None, out=sys.stdout) -> List[Dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args)
    first = rows[0]
    header = (f"bench_model: {args.family} ({FAMILIES[args.family][0]} scaled by {args.scale:g}) from a config "
              f"(H={first['hidden']} I={first['moe_intermediate']} "
          f"E={first['experts']} K={first['top_k']}, {args.layers} layers, vocab {args.vocab}), {args.dtype}, "
          f"prefill T={args.prompt}, decode N={args.new}, median of {args.repeats} interleaved rounds, "
          f"{torch.get_num_threads()} threads; {machine_text('cpu')}; {load_text()}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(header, file=out)
    print(format_table([dict(row, flag=flag_cell(row)) for row in rows], COLUMNS, FORMATS, HEADERS), file=out)
    print("vs eager: eager's median / this one (above 1: faster); MoE share: time inside the MoE blocks / the "
          "whole generate; same tokens: greedy tokens equal to eager's", file=out)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(dict(header=header, argv=sys.argv if argv is None else argv, rows=rows), handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
