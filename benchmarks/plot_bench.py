"""Draws `tpmoe bench --json` rows (or `tpmoe bench --ep` rows) again as the bench's PNG
(tpmoe.cli.plot), e.g. for the plots committed in benchmarks/plots/:

    python benchmarks/plot_bench.py bench.json benchmarks/plots/cpu_block.png --subtitle "Xeon, 2 cores"
"""
import argparse
import datetime
import json
import re

from tpmoe.cli.plot import plot_ep_rows, plot_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument("png_path")
    parser.add_argument("--subtitle", default="", help="a second title line, e.g. the machine and its load")
    args = parser.parse_args()
    with open(args.json_path) as handle:
        payload = json.load(handle)
    rows = payload["rows"]
    # The title's date is the run's (the bench's header ends with it), not the replot's.
    stamp = re.search(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}) UTC", payload.get("header", ""))
    when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M") if stamp else None
    plot = plot_ep_rows if "layout" in rows[0] else plot_rows  # --ep rows are layouts, not implementations
    plot(rows, args.png_path, subtitle=args.subtitle, when=when)
    print(args.png_path)


if __name__ == "__main__":
    main()
