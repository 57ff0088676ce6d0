"""One MoEBlock timed in two checkouts of tpmoe, interleaved: what a change costs, as a ratio.

    PYTHONPATH=. python benchmarks/bench_checkouts.py --base /path/to/old/checkout --head . --rounds 5

Each round starts one worker process per checkout (PYTHONPATH set to it; which goes first
alternates between rounds, so that both sample the same moments of the machine), and each worker
times the block's forward (no grad) and training step (forward + backward) at every T, as a
one-process block and over a one-rank gloo group (a parallel block: since 2026-12-07 its
parameters are DTensors). Reported: head / base of the median time per round, as the median over
rounds with the lowest and highest round (the spread). Both checkouts must be built
(`python setup.py build_ext --inplace`).
"""
import argparse
import json
import os
import subprocess
import sys
import time


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    import tpmoe

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1)
    config = tpmoe.MoEConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_experts=args.experts, top_k=args.top_k)
    dtype = getattr(torch, args.dtype)
    results = {}
    for mode in ("one process", "one-rank group"):
        group = dist.group.WORLD if mode == "one-rank group" else None
        block = tpmoe.MoEBlock(config, group, dtype=dtype, seed=0)
        for tokens in args.tokens:
            x = torch.randn(tokens, config.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(1))
            for step in ("forward", "train"):
                def call():
                    if step == "forward":
                        with torch.no_grad():
                            block(x)
                    else:
                        inputs = x.clone().requires_grad_(True)
                        block(inputs).sum().backward()
                for _ in range(args.warmup):
                    call()
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                results[f"{mode}|{tokens}|{step}"] = sorted(times)[len(times) // 2]
    dist.destroy_process_group()
    print(json.dumps(results))


def _run_worker(checkout: str, argv, port: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    output = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--port", str(port)] + argv,
                            env=env, capture_output=True, text=True, check=False, cwd=os.path.abspath(checkout))
    if output.returncode != 0:
        raise SystemExit(f"worker in {checkout} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="the checkout to compare against (built)")
    parser.add_argument("--head", default=".", help="the checkout measured (built)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 512])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if not args.base:
        parser.error("--base: expected the checkout to compare against")
    if args.rounds < 1:
        parser.error(f"--rounds: expected at least 1, got {args.rounds}")
    from tpmoe.distributed.groups import free_port

    forwarded = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                 if name in ("hidden", "intermediate", "experts", "top_k", "dtype", "threads", "warmup", "repeats")]
    forwarded += ["--tokens"] + [str(t) for t in args.tokens]
    ratios = {}
    for round_index in range(args.rounds):
        order = [("base", args.base), ("head", args.head)]
        if round_index % 2:
            order.reverse()
        times = {name: _run_worker(checkout, forwarded, free_port()) for name, checkout in order}
        for key in times["head"]:
            ratios.setdefault(key, []).append(times["head"][key] / times["base"][key])
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"head / base time (below 1: head faster), median over {args.rounds} interleaved rounds [lowest, highest]; "
          f"H={args.hidden} I={args.intermediate} E={args.experts} top-{args.top_k} {args.dtype}, "
          f"{args.threads} threads")
    print("| block | T | step | head / base | spread |")
    print("|---|---:|---|---:|---|")
    for key, values in ratios.items():
        mode, tokens, step = key.split("|")
        values = sorted(values)
        print(f"| {mode} | {tokens} | {step} | {values[len(values) // 2]:.3f} | [{values[0]:.3f}, {values[-1]:.3f}] |")


if __name__ == "__main__":
    main()
