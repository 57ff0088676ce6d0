"""The `tpmoe` command (also `python -m tpmoe`):

  tpmoe verify [--preset NAME] [--world-size P] [--mode tp|sp] [--ep E] [--scale F|auto] [--tokens T]
  tpmoe bench  [--preset NAME] [--tokens 1,32,512] [--world-size P] [--impl LIST] [--mode fwd|train]
               [--json FILE] [--plot FILE] [--scale F] [--repeats N] [--ep E]
  tpmoe --list-presets

verify: the block of a preset sharded over P ranks against the float64 one-process reference,
forward and backward, collectives counted; exits non-zero on any failure (--ep E: expert
parallelism, E EP ranks x P / E TP ranks). bench: tpmoe at
world sizes 1..P against transformers' experts implementations, a dense GEMM of the same FLOPs
(ceiling) and a read of the weights touched (floor); with --ep E: one process, TP P and EP E x
TP P/E on the same P ranks, interleaved, with the bytes of every collective. Ranks are spawned on this machine (gloo on
CPU, NCCL on GPUs), or are the processes of a `torchrun` launch. On CUDA tensors the experts
run on tpmoe's Triton kernels, on CPU on its C++ path.

Usage errors print one line on stderr and exit with status 2.

This module is the command line's: the parser, the argument types, the checks that need more
than one option, and the plan each command runs (`verify_plan`, `bench_plan`); `tpmoe.cli.main`
runs the plan.
"""
import argparse
import os

from .errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------- argument types

def _expected(choices) -> str:
    """'a or b', 'a, b or c', 'one of a, b, c, d': the words of every check's message."""
    names = [str(choice) for choice in choices]
    if len(names) > 3:
        return "one of " + ", ".join(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 0, got {text!r}")
    return value


def parse_tokens(text: str):
    """'1,32,512' -> [1, 32, 512] (positive, de-duplicated, sorted)."""
    parts = [part.strip() for part in str(text).split(",")]
    if any(part == "" for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of positive integers like 1,32,512, got {text!r}")
    return sorted({positive_int(part) for part in parts})


def scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def scale_or_auto(text: str):
    """A scale, or None for 'auto'."""
    try:
        return None if text == "auto" else scale(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'auto', got {text!r}") from None


def impl_list(text: str):
    """'tpmoe,dense' -> ('tpmoe', 'dense'), each one of tpmoe.cli.bench.IMPLS."""
    from .bench import IMPLS
    impls = tuple(name.strip() for name in text.split(","))
    if not impls or any(name not in IMPLS for name in impls):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(IMPLS)}, got {text!r}")
    return impls


def _dtypes():
    import torch
    # The names first, their short forms after (the order the choices are listed in).
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- the parser

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message.removeprefix("argument "))

    def _check_value(self, action, value):
        # argparse's own check of `choices=`, in the words of the other messages.
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, f"expected {_expected(action.choices)}, got {value!r}")


class _ListPresets(argparse.Action):
    """--list-presets: prints the presets and exits, wherever it is on the line (as --help does)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..presets import describe_presets
        print(describe_presets())
        parser.exit(0)


def _common_options(timeout_s: int):
    from ..presets import PRESETS
    options = _Parser(add_help=False)
    options.add_argument("--preset", default="tiny", choices=list(PRESETS), metavar="NAME",
                         help="a model shape (see --list-presets; default tiny)")
    options.add_argument("--world-size", type=positive_int, default=None,
                         help="number of tensor-parallel ranks (torchrun: the ranks it started)")
    options.add_argument("--timeout", type=positive_int, default=timeout_s, help="process-group timeout in seconds")
    options.add_argument("--device", default="auto", choices=DEVICES,
                         help="cuda (one GPU per rank, NCCL, Triton kernels), cpu (gloo, C++ kernels) or auto: "
                              "cuda when there is a GPU for every rank")
    return options


def build_parser():
    from ..fused import BACKENDS
    from .verify import FAULTS

    list_presets = _Parser(add_help=False)
    list_presets.add_argument("--list-presets", action=_ListPresets, help="print the presets and exit")
    parser = _Parser(prog="tpmoe", description=__doc__.split("\n\nUsage errors")[0], parents=[list_presets],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    verify = commands.add_parser("verify", help="check a sharded block against the float64 reference",
                                 parents=[list_presets, _common_options(300)])
    verify.add_argument("--mode", default="tp", choices=("tp", "sp"),
                        help="tp (replicated tokens) or sp (sequence-parallel)")
    verify.add_argument("--ep", type=positive_int, default=1,
                        help="expert-parallel ranks E (default 1: none); --world-size P = E x the TP ranks")
    verify.add_argument("--scale", type=scale_or_auto, default="auto",
                        help="shrink hidden/intermediate sizes by F in (0, 1]; auto: the float64 reference fits "
                             "in 64 MiB")
    verify.add_argument("--tokens", type=positive_int, default=37,
                        help="number of tokens (default 37: prime, uneven splits)")
    verify.add_argument("--dtype", default="float32", choices=list(_dtypes()),
                        help="float32 (1e-5), bfloat16 or float16")
    verify.add_argument("--seed", type=non_negative_int, default=0)
    verify.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="tpmoe.fused_experts backend (auto: Triton on CUDA)")
    verify.add_argument("--inject-fault", default=None, choices=FAULTS, help=argparse.SUPPRESS)

    bench = commands.add_parser("bench", help="time tpmoe against transformers and the hardware yardsticks",
                                parents=[list_presets, _common_options(3600)])
    bench.add_argument("--tokens", type=parse_tokens, default="1,32,512", help="comma-separated token counts")
    bench.add_argument("--impl", type=impl_list, default=None,
                       help="comma-separated subset of: tpmoe, hf_eager, hf_grouped_mm, dense, floor (default: all)")
    bench.add_argument("--mode", default="fwd", choices=("fwd", "train"),
                       help="fwd (inference) or train (forward + backward)")
    bench.add_argument("--json", default=None, help="write the rows to this JSON file")
    bench.add_argument("--plot", default=None, help="write a PNG plot (needs matplotlib)")
    bench.add_argument("--scale", type=scale, default=1.0, help="shrink hidden/intermediate sizes by F in (0, 1]")
    bench.add_argument("--repeats", type=positive_int, default=5,
                       help="timed repeats per measurement (median reported)")
    bench.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs before the repeats")
    bench.add_argument("--dtype", default="bfloat16", choices=list(_dtypes()), help="bfloat16, float16 or float32")
    bench.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads per rank (default: the cores shared out)")
    bench.add_argument("--ep", type=positive_int, default=1,
                       help="expert-parallel ranks E (default 1: none): times one process, TP P and EP E x TP P/E "
                            "on --world-size P ranks, with the bytes of each collective")
    return parser


# --------------------------------------------------------------------------- checks that need more than one option

def resolve_device(requested: str, world_size) -> str:
    """--device auto|cpu|cuda -> "cpu" or "cuda" (auto: CUDA when there is a GPU for each rank)."""
    import torch

    from .launch import pick_device
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda requested, but torch sees no CUDA device here")
    return pick_device(world_size or 1, requested)


def check_world_size(value: int, config, device_type: str = "cpu", ep_size: int = 1) -> int:
    from .launch import launched_by_torchrun, max_world_size, torchrun_world_size
    if ep_size > config.num_experts:  # first: the world size it implies may also be too large
        raise UsageError(f"--ep: expected at most {config.num_experts} (the preset's experts: every EP rank owns at "
                         f"least one), got {ep_size}")
    if launched_by_torchrun():
        launched = torchrun_world_size()
        if value is not None and value != launched:
            raise UsageError(f"--world-size: torchrun started {launched} ranks, got --world-size {value}")
        value = launched
    else:
        limit = max_world_size(device_type)
        if value > limit:
            where = f"one rank per GPU, {limit} GPUs here" if device_type == "cuda" else "ranks on this CPU"
            raise UsageError(f"--world-size: expected at most {limit} ({where}), got {value}")
    if ep_size > 1:
        return _check_expert_parallel(value, config, ep_size)
    if not launched_by_torchrun() and value > config.intermediate_size:
        raise UsageError(f"--world-size: expected at most {config.intermediate_size} (the preset's intermediate "
                         f"size: every rank holds at least one column), got {value}")
    return value


def _check_expert_parallel(world_size: int, config, ep_size: int) -> int:
    """--ep E with P ranks: E divides P (P / E TP ranks each) and P / E <= I (E <= the experts is
    checked first, by check_world_size)."""
    if world_size % ep_size:
        raise UsageError(f"--world-size: expected a multiple of --ep {ep_size} (EP x TP ranks), got {world_size}")
    if world_size // ep_size > config.intermediate_size:
        raise UsageError(f"--world-size: expected at most {ep_size * config.intermediate_size} with --ep {ep_size} "
                         f"(TP ranks up to the preset's intermediate size {config.intermediate_size}), got "
                         f"{world_size}")
    return world_size


def _world_size(args, config, default: int, ep_size: int = 1):
    """(world size, device type) from --world-size (default `default`; under torchrun its ranks) and --device."""
    from .launch import launched_by_torchrun
    requested = args.world_size if args.world_size is not None or launched_by_torchrun() else default
    device_type = resolve_device(args.device, requested)
    return check_world_size(requested, config, device_type, ep_size), device_type


# --------------------------------------------------------------------------- the plans


def verify_plan(args):
    """The VerifyPlan of a parsed `tpmoe verify` line, its options checked together."""
    from ..presets import get_preset, scaled_config
    from .verify import VerifyPlan, auto_scale

    preset = get_preset(args.preset)
    scale_factor = auto_scale(preset.config) if args.scale is None else args.scale
    config = scaled_config(preset.config, scale_factor)
    world_size, device_type = _world_size(args, config, default=max(2, args.ep), ep_size=args.ep)
    if args.backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"--backend: triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), this run is "
                         f"on {device_type}: use --backend auto or cpu, or set TRITON_INTERPRET=1 (slow)")
    if args.ep > 1 and args.mode == "sp":
        raise UsageError("--mode: expected tp with --ep (expert parallelism holds each rank's own tokens already), "
                         "got sp")
    return VerifyPlan(preset=preset.name, config=config, scale=scale_factor, world_size=world_size,
                      sequence_parallel=args.mode == "sp", num_tokens=args.tokens, dtype=_dtypes()[args.dtype],
                      seed=args.seed, backend=args.backend, fault=args.inject_fault, device_type=device_type,
                      ep_size=args.ep)


def bench_plan(args):
    """The BenchPlan of a parsed `tpmoe bench` line, its options checked together."""
    import torch

    from ..presets import get_preset, scaled_config
    from .bench import IMPLS, BenchPlan

    preset = get_preset(args.preset)
    config = scaled_config(preset.config, args.scale)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and args.device != "cpu" else 0
    if args.ep > 1:
        if args.impl is not None:
            raise UsageError("--impl: not used with --ep (it times tpmoe in three layouts: one process, TP and EP), "
                             f"got {','.join(args.impl)}")
        world_size, device_type = _world_size(args, config, default=max(2, args.ep), ep_size=args.ep)
    else:
        world_size, device_type = _world_size(args, config, default=gpus or 1)
    return BenchPlan(preset=preset.name, family=preset.family, config=config, scale=args.scale,
                     world_size=world_size, tokens=tuple(args.tokens), impls=args.impl or IMPLS, mode=args.mode,
                     dtype=_dtypes()[args.dtype], repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                     device_type=device_type, ep_size=args.ep)
