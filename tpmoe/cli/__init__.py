"""The `tpmoe` command (also `python -m tpmoe`):

  tpmoe verify [--preset NAME] [--world-size P] [--mode tp|sp] [--scale F|auto] [--tokens T]
  tpmoe bench  [--preset NAME] [--tokens 1,32,512] [--world-size P] [--impl LIST] [--mode fwd|train]
               [--json FILE] [--plot FILE] [--scale F] [--repeats N]
  tpmoe --list-presets

verify: the block of a preset sharded over P ranks against the float64 one-process reference,
forward and backward, collectives counted; exits non-zero on any failure. bench: tpmoe at
world sizes 1..P against transformers' experts implementations, a dense GEMM of the same FLOPs
(ceiling) and a read of the weights touched (floor). Ranks are spawned on this machine (gloo on
CPU, NCCL on GPUs), or are the processes of a `torchrun` launch. On CUDA tensors the experts
run on tpmoe's Triton kernels, on CPU on its C++ path.

Usage errors print one line on stderr and exit with status 2.
"""
import argparse
import sys

EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{what}: expected a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"{what}: expected a positive integer, got {value}")
    return value


def parse_tokens(text: str):
    """'1,32,512' -> [1, 32, 512] (positive, de-duplicated, sorted)."""
    parts = [part.strip() for part in str(text).split(",")]
    if not parts or any(part == "" for part in parts):
        raise UsageError(f"--tokens: expected a comma-separated list of positive integers like 1,32,512, got {text!r}")
    return sorted({_positive_int(part, "--tokens") for part in parts})


def parse_scale(text: str, allow_auto: bool):
    if allow_auto and text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        expected = "a number in (0, 1]" + (" or 'auto'" if allow_auto else "")
        raise UsageError(f"--scale: expected {expected}, got {text!r}")
    return value


def resolve_device(requested: str, world_size) -> str:
    """--device auto|cpu|cuda -> "cpu" or "cuda" (auto: CUDA when there is a GPU for each rank)."""
    import torch

    from .launch import pick_device
    if requested not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device: expected auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda requested, but torch sees no CUDA device here")
    return pick_device(world_size or 1, requested)


def check_world_size(value: int, config, device_type: str = "cpu") -> int:
    from .launch import launched_by_torchrun, max_world_size, torchrun_world_size
    if launched_by_torchrun():
        launched = torchrun_world_size()
        if value is not None and value != launched:
            raise UsageError(f"--world-size: torchrun started {launched} ranks, got --world-size {value}")
        return launched
    if value < 1:
        raise UsageError(f"--world-size: expected a positive integer, got {value}")
    limit = max_world_size(device_type)
    if value > limit:
        where = f"one rank per GPU, {limit} GPUs here" if device_type == "cuda" else "ranks on this CPU"
        raise UsageError(f"--world-size: expected at most {limit} ({where}), got {value}")
    if value > config.intermediate_size:
        raise UsageError(f"--world-size: expected at most {config.intermediate_size} (the preset's intermediate "
                         f"size: every rank holds at least one column), got {value}")
    return value


def _common_arguments(parser, timeout_s):
    parser.add_argument("--preset", default=None, help="a model shape (see --list-presets)")
    parser.add_argument("--world-size", type=str, default=None,
                        help="number of tensor-parallel ranks (torchrun: the ranks it started)")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    parser.add_argument("--timeout", type=str, default=str(timeout_s), help="process-group timeout in seconds")
    parser.add_argument("--device", default="auto",
                        help="cuda (one GPU per rank, NCCL, Triton kernels), cpu (gloo, C++ kernels) or auto: "
                             "cuda when there is a GPU for every rank")


def build_parser():
    parser = _Parser(prog="tpmoe", description=__doc__.split("\n\nUsage errors")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    verify = commands.add_parser("verify", help="check a sharded block against the float64 reference")
    _common_arguments(verify, 300)
    verify.add_argument("--mode", default="tp", help="tp (replicated tokens) or sp (sequence-parallel)")
    verify.add_argument("--scale", default="auto",
                        help="shrink hidden/intermediate sizes by F in (0, 1]; auto: the float64 reference fits "
                             "in 64 MiB")
    verify.add_argument("--tokens", default="37", help="number of tokens (default 37: prime, uneven splits)")
    verify.add_argument("--dtype", default="float32", help="float32 (1e-5), bfloat16 or float16")
    verify.add_argument("--seed", default="0")
    verify.add_argument("--backend", default="auto", help="tpmoe.fused_experts backend (auto: Triton on CUDA)")
    verify.add_argument("--inject-fault", default=None, help=argparse.SUPPRESS)

    bench = commands.add_parser("bench", help="time tpmoe against transformers and the hardware yardsticks")
    _common_arguments(bench, 3600)
    bench.add_argument("--tokens", default="1,32,512", help="comma-separated token counts")
    bench.add_argument("--impl", default=None, help="comma-separated subset of: tpmoe, hf_eager, hf_grouped_mm, "
                                                    "dense, floor (default: all)")
    bench.add_argument("--mode", default="fwd", help="fwd (inference) or train (forward + backward)")
    bench.add_argument("--json", default=None, help="write the rows to this JSON file")
    bench.add_argument("--plot", default=None, help="write a PNG plot (needs matplotlib)")
    bench.add_argument("--scale", default="1", help="shrink hidden/intermediate sizes by F in (0, 1]")
    bench.add_argument("--repeats", default="5", help="timed repeats per measurement (median reported)")
    bench.add_argument("--warmup", default="1", help="untimed runs before the repeats")
    bench.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    bench.add_argument("--threads", default=None, help="CPU threads per rank (default: the cores shared out)")
    return parser


def _dtype(text: str):
    import torch
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if text not in dtypes:
        raise UsageError(f"--dtype: expected one of float32, bfloat16, float16, got {text!r}")
    return dtypes[text]


def _default_preset(args):
    return args.preset if args.preset is not None else "tiny"


def _verify(args) -> int:
    from ..presets import get_preset, scaled_config
    from .verify import FAULTS, VerifyPlan, auto_scale, run_verify

    preset = get_preset(_default_preset(args))
    scale = parse_scale(args.scale, allow_auto=True)
    scale = auto_scale(preset.config) if scale is None else scale
    config = scaled_config(preset.config, scale)
    if args.mode not in ("tp", "sp"):
        raise UsageError(f"--mode: expected tp or sp, got {args.mode!r}")
    requested = None if args.world_size is None and _torchrun() else _positive_int(args.world_size or "2",
                                                                                    "--world-size")
    device_type = resolve_device(args.device, requested)
    world_size = check_world_size(requested, config, device_type)
    num_tokens = _positive_int(args.tokens, "--tokens")
    if args.inject_fault is not None and args.inject_fault not in FAULTS:
        raise UsageError(f"--inject-fault: expected one of {FAULTS}, got {args.inject_fault!r}")
    from ..fused import BACKENDS
    if args.backend not in BACKENDS:
        raise UsageError(f"--backend: expected one of {', '.join(BACKENDS)}, got {args.backend!r}")
    plan = VerifyPlan(preset=preset.name, config=config, scale=scale, world_size=world_size,
                      sequence_parallel=args.mode == "sp", num_tokens=num_tokens, dtype=_dtype(args.dtype),
                      seed=_non_negative_int(args.seed, "--seed"), backend=args.backend, fault=args.inject_fault,
                      device_type=device_type)
    return run_verify(plan, timeout_s=_positive_int(args.timeout, "--timeout"), out=sys.stdout)


def _bench(args) -> int:
    from ..presets import get_preset, scaled_config
    from .bench import IMPLS, BenchPlan, run_bench

    preset = get_preset(_default_preset(args))
    scale = parse_scale(args.scale, allow_auto=False)
    config = scaled_config(preset.config, scale)
    if args.mode not in ("fwd", "train"):
        raise UsageError(f"--mode: expected fwd or train, got {args.mode!r}")
    import torch
    default_world_size = str(torch.cuda.device_count()) if torch.cuda.is_available() and args.device != "cpu" else "1"
    requested = None if args.world_size is None and _torchrun() else _positive_int(
        args.world_size or default_world_size, "--world-size")
    device_type = resolve_device(args.device, requested)
    world_size = check_world_size(requested, config, device_type)
    impls = IMPLS if args.impl is None else [name.strip() for name in args.impl.split(",")]
    unknown = [name for name in impls if name not in IMPLS]
    if unknown or not impls:
        raise UsageError(f"--impl: expected a comma-separated subset of {', '.join(IMPLS)}, got {args.impl!r}")
    plan = BenchPlan(preset=preset.name, family=preset.family, config=config, scale=scale, world_size=world_size,
                     tokens=parse_tokens(args.tokens), impls=tuple(impls), mode=args.mode, dtype=_dtype(args.dtype),
                     repeats=_positive_int(args.repeats, "--repeats"),
                     warmup=_non_negative_int(args.warmup, "--warmup"),
                     threads=None if args.threads is None else _positive_int(args.threads, "--threads"),
                     device_type=device_type)
    return run_bench(plan, json_path=args.json, plot_path=args.plot,
                     timeout_s=_positive_int(args.timeout, "--timeout"), out=sys.stdout)


def _non_negative_int(text, what):
    return 0 if str(text).strip() == "0" else _positive_int(text, what)


def _torchrun():
    from .launch import launched_by_torchrun
    return launched_by_torchrun()


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.list_presets:
            from ..presets import describe_presets
            print(describe_presets())
            return 0
        if args.command is None:
            raise UsageError("expected a command: verify or bench (or --list-presets; --help for more)")
        return _verify(args) if args.command == "verify" else _bench(args)
    except (UsageError, ValueError) as error:
        # Our checks (and MoEConfig's) name the argument, what was expected and what came.
        message = str(error)
        print(f"tpmoe: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `tpmoe ... | head`: the reader left; say nothing more
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("tpmoe: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        from .launch import RankFailure
        if isinstance(error, RankFailure):
            print(f"tpmoe: a rank failed:\n{error}", file=sys.stderr)
            return 1
        raise
