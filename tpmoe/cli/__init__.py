"""The `tpmoe` command (also `python -m tpmoe`): `main` parses the command line
(tpmoe.cli.arguments, where its usage is written and every option is checked), runs the command
(tpmoe.cli.verify, tpmoe.cli.bench, tpmoe.cli.bench_ep) and turns a usage error into one line on
stderr and exit status 2.
"""
import sys

# The names the command line is checked with, importable from here as before the split.
from .arguments import (DEVICES, bench_plan, build_parser, check_world_size, impl_list, non_negative_int,  # noqa: F401
                        parse_tokens, positive_int, resolve_device, scale, scale_or_auto, verify_plan)
from .errors import EXIT_USAGE, UsageError  # noqa: F401


def _verify(args) -> int:
    from .verify import run_verify
    return run_verify(verify_plan(args), timeout_s=args.timeout, out=sys.stdout)


def _bench(args) -> int:
    plan = bench_plan(args)
    # The layouts are chosen here, once: the one-process and TP bench, or one process / TP / EP.
    if plan.ep_size > 1:
        from .bench_ep import run_bench_ep as run
    else:
        from .bench import run_bench as run
    return run(plan, json_path=args.json, plot_path=args.plot, timeout_s=args.timeout, out=sys.stdout)


COMMANDS = {"verify": _verify, "bench": _bench}


def main(argv=None) -> int:
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_request:  # --help, --list-presets
            return exit_request.code or 0
        if args.command is None:
            parser.error("expected a command: verify or bench (or --list-presets; --help for more)")
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"tpmoe: error: {error}", file=sys.stderr)
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
