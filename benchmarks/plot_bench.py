"""Draws `tpmoe bench --json` rows (or `tpmoe bench --ep` rows) again as the bench's PNG
(tpmoe.cli.plot), and benchmarks/bench_model.py's rows as tokens/s bars, e.g. for the plots
committed in benchmarks/plots/:

    python benchmarks/plot_bench.py bench.json benchmarks/plots/cpu_block.png --subtitle "Xeon, 2 cores"
"""
import argparse
import datetime
import json
import re

from tpmoe.cli.plot import check_plotting, plot_ep_rows, plot_rows, shrink_png


def plot_aot_rows(rows, path: str, subtitle: str = "", when=None) -> None:
    """`python -m tpmoe.triton.aot --json` rows: registers per thread of each launch at each
    I_p, against the 255 a thread can hold (above: spills, which get a red edge)."""
    check_plotting()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    launches = list(dict.fromkeys((row["kernel"], row["variant"]) for row in rows))
    sizes = sorted({row["intermediate"] for row in rows}, reverse=True)
    by_key = {(row["kernel"], row["variant"], row["intermediate"]): row for row in rows}
    figure, axis = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(sizes)
    for index, size in enumerate(sizes):
        points = [by_key.get((kernel, variant, size)) for kernel, variant in launches]
        xs = [position + index * width for position in range(len(launches))]
        axis.bar(xs, [p["registers"] if p else 0 for p in points], width=width, label=f"I_p = {size}",
                 edgecolor=["red" if p and p["spill_stores"] else "none" for p in points], linewidth=1.5)
    axis.axhline(255, color="0.3", linestyle="--", linewidth=1.0, label="255: the most a thread holds")
    axis.set_xticks([position + 0.4 - width / 2 for position in range(len(launches))],
                    [f"{kernel}\n{variant}" for kernel, variant in launches], fontsize=7, rotation=60, ha="right")
    axis.set_ylabel("registers per thread")
    axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    first = rows[0]
    stamp = f", {when:%Y-%m-%d %H:%M} UTC" if when else ""
    figure.suptitle(f"tpmoe.triton.aot: main config of each launch, {first['dtype']}, {first['layout']}, "
                    f"sm_{first['cc']} (ptxas, no GPU){stamp}; red edge: spills" + (f"\n{subtitle}" if subtitle else ""),
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    shrink_png(path)


def plot_model_rows(rows, path: str, subtitle: str = "", when=None) -> None:
    """bench_model.py's rows: tokens/s per variant, prefill and decode side by side, whiskers from
    the slowest to the fastest round."""
    check_plotting()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = ("prefill", "decode")
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    # bench_model.py's rows compare with eager, bench_model_tp.py's with transformers' TP.
    speedup = next(key for key in rows[0] if key.startswith("speedup_vs_"))
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, phase in zip(axes, phases):
        points = {row["variant"]: row for row in rows if row["phase"] == phase}
        rates = [points[v]["tokens_per_s"] for v in variants]
        # tokens / max_ms is the slowest round's rate, tokens / min_ms the fastest's.
        low = [rate - points[v]["tokens"] / (points[v]["max_ms"] * 1e-3) for v, rate in zip(variants, rates)]
        high = [points[v]["tokens"] / (points[v]["min_ms"] * 1e-3) - rate for v, rate in zip(variants, rates)]
        colors = [plt.get_cmap("tab10")(index) for index in range(len(variants))]
        axis.bar(variants, rates, yerr=[low, high], capsize=4, color=colors, alpha=0.85)
        for index, variant in enumerate(variants):
            axis.annotate(f"{points[variant][speedup]:.2f}x", (index, rates[index]), ha="center",
                          va="bottom", fontsize=8, xytext=(10, 2), textcoords="offset points")
        tokens = points[variants[0]]["tokens"]
        axis.set_title(f"{phase}: {'T' if phase == 'prefill' else 'N'} = {tokens} tokens", fontsize=9)
        axis.set_ylabel("tokens per second (median)")
        axis.grid(True, axis="y", alpha=0.3)
    first = rows[0]
    stamp = f", {when:%Y-%m-%d %H:%M} UTC" if when else ""
    sizes = (f"H={first['hidden']} I={first['moe_intermediate']} E={first['experts']} K={first['top_k']}, "
             if "experts" in first else f"H={first['hidden']}, ")
    world = f", TP {first['world_size']}" if "world_size" in first else ""
    figure.suptitle(f"{first.get('family', 'qwen3_moe')} from a config ({sizes}{first['layers']} layers){world}, "
                    f"{first['dtype']}, {first['threads']} thread(s) per rank{stamp};\n"
                    f"labels: {speedup.replace('_', ' ')}; whiskers: slowest..fastest round"
                    + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    shrink_png(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path")
    parser.add_argument("png_path")
    parser.add_argument("--subtitle", default="", help="a second title line, e.g. the machine and its load")
    parser.add_argument("--date", default=None, help="'YYYY-MM-DD HH:MM' UTC of the run, where the JSON has no header")
    args = parser.parse_args(argv)
    with open(args.json_path) as handle:
        payload = json.load(handle)
    rows = payload["rows"] if isinstance(payload, dict) else payload  # tpmoe.triton.aot writes a bare list
    # The title's date is the run's (the bench's header ends with it), not the replot's.
    header = payload.get("header", "") if isinstance(payload, dict) else ""
    stamp = re.search(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}) UTC", header) or re.search(
        r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2})", args.date or "")
    when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M") if stamp else None
    # --ep rows are layouts, bench_model.py's variants, the bench's implementations.
    plot = (plot_ep_rows if "layout" in rows[0] and "kernel" not in rows[0] else plot_aot_rows if "kernel" in rows[0]
            else plot_model_rows if "phase" in rows[0] else plot_rows)
    plot(rows, args.png_path, subtitle=args.subtitle, when=when)
    print(args.png_path)


if __name__ == "__main__":
    main()
