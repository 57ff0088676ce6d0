"""Draws `tpmoe bench --json` rows (or `tpmoe bench --ep` rows) again as the bench's PNG
(tpmoe.cli.plot), e.g. for the plots committed in benchmarks/plots/:

    python benchmarks/plot_bench.py bench.json benchmarks/plots/cpu_block.png --subtitle "Xeon, 2 cores"
"""
import argparse
import json

from tpmoe.cli.plot import plot_ep_rows, plot_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument("png_path")
    parser.add_argument("--subtitle", default="", help="a second title line, e.g. the machine and its load")
    args = parser.parse_args()
    with open(args.json_path) as handle:
        rows = json.load(handle)["rows"]
    plot = plot_ep_rows if "layout" in rows[0] else plot_rows  # --ep rows are layouts, not implementations
    plot(rows, args.png_path, subtitle=args.subtitle)
    print(args.png_path)


if __name__ == "__main__":
    main()
