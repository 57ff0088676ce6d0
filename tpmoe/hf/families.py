"""Which transformers MoE blocks tpmoe runs, and how: the snapshot of the installed release.

    python -m tpmoe.hf.families            # the judgement of every MoE block class, printed
    python -m tpmoe.hf.families --write    # the same, written to tpmoe/hf/families_snapshot.json

The judgement is made from the code of the installed transformers alone (tpmoe/hf/judge.py,
against the verified pieces of tpmoe/hf/registry.py). The snapshot records it for the release
the suite pins (tools/ensure_deps.py): supported blocks with how they run ("block <structure>,
native <router> router" or "its own router": the whole block is tpmoe's; "experts": only its
experts module is), refused ones with the reason. tests/hf/test_hf_families.py checks that the
snapshot is the judgement of the installed release, both lists, and runs every supported block
against transformers' own.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict

SNAPSHOT_PATH = Path(__file__).with_name("families_snapshot.json")
COMMAND = "python -m tpmoe.hf.families --write"


def current_snapshot(progress=None) -> Dict[str, object]:
    """The judgement of the installed transformers, in the snapshot's form (progress: as for
    judge.scan_installed_families)."""
    import transformers

    from .judge import scan_installed_families

    supported, rejected = scan_installed_families(progress)
    return {"transformers": transformers.__version__, "command": COMMAND,
            "supported": dict(sorted(supported.items())), "rejected": dict(sorted(rejected.items()))}


def _progress_on(stream):
    """The scan imports ~400 modeling files (half a minute or more): one line per tenth on a log,
    one line rewritten in place on a terminal."""
    interactive = stream.isatty()

    def progress(done: int, total: int, family: str) -> None:
        if interactive:
            print(f"\rjudging transformers.models: {done + 1}/{total} {family:<40}", end="", file=stream, flush=True)
            if done + 1 == total:
                print(file=stream)
        elif done % max(1, total // 10) == 0:
            print(f"judging transformers.models: {done + 1}/{total} ({family})", file=stream, flush=True)
    return progress


def load_snapshot() -> Dict[str, object]:
    return json.loads(SNAPSHOT_PATH.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpmoe.hf.families", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {SNAPSHOT_PATH.name} from the scan")
    args = parser.parse_args(argv)
    snapshot = current_snapshot(_progress_on(sys.stderr))
    print(f"transformers {snapshot['transformers']}: {len(snapshot['supported'])} MoE blocks supported, "
          f"{len(snapshot['rejected'])} refused")
    for title in ("supported", "rejected"):
        print(f"{title}:")
        for key, value in snapshot[title].items():
            print(f"  {key}: {value}")
    if args.write:
        SNAPSHOT_PATH.write_text(json.dumps(snapshot, indent=1) + "\n")
        print(f"wrote {SNAPSHOT_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
