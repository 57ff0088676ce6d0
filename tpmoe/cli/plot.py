"""The bench's PNGs: time per step and throughput against tokens (log-log); with --ep, time per
step and the bytes handed to collectives per layout. matplotlib is an optional extra
(`pip install 'tpmoe[plot]'`).

Read at a glance: each contender (tpmoe, transformers' blocks) is a line through its medians
with a band from its fastest to its slowest sample; the yardsticks (dense ceiling, read floor)
are thin grey reference lines, and the region faster than the better of them is shaded, since
no contender can be there (a point there is flagged in the table: tpmoe.cli.spread). A flagged
contender point gets a red ring. Colour: the implementation; line style: the world size."""
import datetime
from typing import Dict, List, Optional

from .errors import UsageError

YARDSTICKS = {"dense": "dense ceiling", "floor": "read floor"}
LINE_STYLES = ["-", "--", ":", "-."]


class PlottingUnavailable(UsageError):
    """--plot without matplotlib: said before the bench runs."""


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlottingUnavailable("--plot: needs matplotlib, which is not installed "
                                  "(pip install 'tpmoe[plot]' or pip install matplotlib)") from None


def _values(rows: List[Dict], field: str) -> str:
    return ", ".join(str(value) for value in sorted({row.get(field) for row in rows}, key=str))


def _start_figure():
    """(plt, figure, two axes with log-log scales and the tokens' label)."""
    check_plotting()
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis in axes:  # log scales before any data: _shade_beyond_limit reads the autoscaled limits
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens per step (T)")
        axis.grid(True, which="both", alpha=0.3)
    return plt, figure, axes


def _finish_figure(plt, figure, axes, rows, path, title, order=lambda label: 0) -> None:
    """Legend outside the axes (labels from the first axis, once each, sorted by `order`), the
    measured T as plain tick labels, the title, a paletted PNG."""
    import matplotlib.ticker

    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(sorted(dict(zip(labels, handles)).items(), key=lambda item: order(item[0])))
    figure.legend(unique.values(), unique.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                  frameon=False)
    all_tokens = sorted({row["tokens"] for row in rows})
    for axis in axes:
        axis.set_xticks(all_tokens, [str(t) for t in all_tokens])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90, bbox_inches="tight")  # tight: the legend outside the axes is kept
    plt.close(figure)
    shrink_png(path)


def plot_title(rows: List[Dict], when: Optional[datetime.datetime] = None) -> str:
    """'tpmoe bench: qwen3-30b-a3b (scale 0.25), fwd, bfloat16, world size 1..2, threads per rank
    P=1: 2, P=2: 1, cpu, 2026-12-07 16:20 UTC' from the rows (one preset per plot)."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    world_sizes = sorted({row["world_size"] for row in rows})
    threads = {row["world_size"]: row.get("threads") for row in rows}
    thread_text = ("threads per rank " + ", ".join(f"P={p}: {threads[p]}" for p in world_sizes)
                   if any(threads.values()) else "")
    parts = [f"tpmoe bench: {_values(rows, 'preset')} (scale {_values(rows, 'scale')})", _values(rows, "mode"),
             _values(rows, "dtype"), "world size " + (f"{world_sizes[0]}..{world_sizes[-1]}" if len(world_sizes) > 1 else f"{world_sizes[0]}"), thread_text,
             _values(rows, "device"), f"{when:%Y-%m-%d %H:%M} UTC"]
    return ", ".join(part for part in parts if part)


def _series(rows: List[Dict]) -> Dict:
    """{(impl, world size): rows sorted by tokens}."""
    series = {}
    for row in rows:
        series.setdefault((row["impl"], row["world_size"]), []).append(row)
    for points in series.values():
        points.sort(key=lambda row: row["tokens"])
    return series


def plot_rows(rows: List[Dict], path: str, title: str = "", subtitle: str = "",
              when: Optional[datetime.datetime] = None) -> None:
    """rows: `tpmoe bench`'s JSON rows. title: default plot_title(rows, when) (when: the run's
    time, default now); subtitle: a second line (e.g. the machine)."""
    plt, figure, axes = _start_figure()
    time_axis, throughput_axis = axes
    time_axis.set_ylabel("ms per step (median; band: min..max)")
    throughput_axis.set_ylabel("block GFLOP/s (median; band: min..max)")
    series = _series(rows)
    contenders = sorted({impl for impl, _ in series if impl not in YARDSTICKS})
    colors = {impl: plt.get_cmap("tab10")(index % 10) for index, impl in enumerate(contenders)}
    # A point's value on each axis: the time, and the block's FLOPs per second (gflops x median / t).
    measures = ((time_axis, lambda row, ms: ms), (throughput_axis, lambda row, ms: row["gflops"] * row["median_ms"] / ms))

    for (impl, world_size), points in sorted(series.items()):
        tokens = [row["tokens"] for row in points]
        style = LINE_STYLES[(world_size - 1) % len(LINE_STYLES)]
        for axis, value in measures:
            median = [value(row, row["median_ms"]) for row in points]
            if impl in YARDSTICKS:
                axis.plot(tokens, median, color="0.45", linestyle=style, linewidth=1.0,
                          marker="^" if impl == "dense" else "v", markersize=3,
                          label=f"{YARDSTICKS[impl]} P={world_size}" if axis is time_axis else None)
                continue
            fastest = [value(row, row.get("min_ms", row["median_ms"])) for row in points]
            slowest = [value(row, row.get("max_ms", row["median_ms"])) for row in points]
            axis.fill_between(tokens, fastest, slowest, color=colors[impl], alpha=0.18, linewidth=0)
            axis.plot(tokens, median, color=colors[impl], linestyle=style, linewidth=2.0, marker="o", markersize=4,
                      label=f"{impl} P={world_size}" if axis is time_axis else None)
            flagged = [(t, m) for t, m, row in zip(tokens, median, points) if row.get("flags")]
            if flagged:
                axis.scatter(*zip(*flagged), s=70, facecolors="none", edgecolors="red", linewidths=1.2, zorder=5,
                             label="flagged (see table)" if axis is time_axis else None)

    _shade_beyond_limit(rows, time_axis, throughput_axis)
    # Contenders first, then the flag ring, then the reference lines.
    _finish_figure(plt, figure, axes, rows, path, (title or plot_title(rows, when)) + (f"\n{subtitle}" if subtitle else ""),
                   order=lambda label: (label.startswith(("dense", "read", "faster")), label.startswith("flagged")))


def shrink_png(path: str) -> None:
    """Re-saves the PNG with a 256-colour palette (a third of the bytes; the plots in
    benchmarks/plots are committed). Pillow comes with matplotlib."""
    from PIL import Image
    with Image.open(path) as image:
        paletted = image.convert("RGB").quantize(colors=256)
    paletted.save(path, optimize=True)


def _shade_beyond_limit(rows, time_axis, throughput_axis) -> None:
    """Shades, per T, the times below max(dense, floor) at the smallest world size: faster than
    both yardsticks allow."""
    world_size = min(row["world_size"] for row in rows)
    limits = sorted((row["tokens"], row["limit_ms"], row["gflops"] * row["median_ms"] / row["limit_ms"])
                    for row in rows if row["world_size"] == world_size and row.get("limit_ms")
                    and row["impl"] not in YARDSTICKS)
    limits = sorted({t: (ms, gflops) for t, ms, gflops in limits}.items())
    if len(limits) < 1:
        return
    tokens = [t for t, _ in limits]
    # The band reaches 1000x below the limit; the axes keep the data's range.
    kept = [(axis, axis.get_ylim()) for axis in (time_axis, throughput_axis)]
    time_axis.fill_between(tokens, [ms for _, (ms, _) in limits], [ms * 1e-3 for _, (ms, _) in limits],
                           color="0.85", alpha=0.6, linewidth=0,
                           label=f"faster than max(ceiling, floor) P={world_size}")
    throughput_axis.fill_between(tokens, [g for _, (_, g) in limits], [g * 1e3 for _, (_, g) in limits],
                                 color="0.85", alpha=0.6, linewidth=0)
    for axis, ylim in kept:
        axis.set_ylim(*ylim)


def plot_ep_rows(rows: List[Dict], path: str, subtitle: str = "", when: Optional[datetime.datetime] = None) -> None:
    """`tpmoe bench --ep`'s rows: per layout, ms per step (median, band min..max) and the bytes
    handed to the collectives per step, summed over the ranks (measured)."""
    plt, figure, (time_axis, bytes_axis) = _start_figure()
    time_axis.set_ylabel("ms per step (median; band: min..max)")
    bytes_axis.set_ylabel("bytes to collectives per step (all ranks)")
    layouts = list(dict.fromkeys(row["layout"] for row in rows))
    for index, layout in enumerate(layouts):
        points = sorted((row for row in rows if row["layout"] == layout), key=lambda row: row["tokens"])
        tokens = [row["tokens"] for row in points]
        color = plt.get_cmap("tab10")(index % 10)
        time_axis.fill_between(tokens, [row["min_ms"] for row in points], [row["max_ms"] for row in points],
                               color=color, alpha=0.18, linewidth=0)
        time_axis.plot(tokens, [row["median_ms"] for row in points], color=color, marker="o", markersize=4,
                       linewidth=2.0, label=layout)
        flagged = [(row["tokens"], row["median_ms"]) for row in points if row.get("flags")]
        if flagged:
            time_axis.scatter(*zip(*flagged), s=70, facecolors="none", edgecolors="red", linewidths=1.2, zorder=5,
                              label="flagged (see table)")
        for name, marker in (("all_to_all_single", "s"), ("all_reduce", "D")):
            moved = [(row["tokens"], row["bytes_per_collective"].get(name)) for row in points]
            moved = [(t, b) for t, b in moved if b]
            if moved:  # one process moves nothing: no points on a log axis
                bytes_axis.plot(*zip(*moved), color=color, marker=marker, markersize=4, linewidth=1.5,
                                linestyle="-" if name == "all_to_all_single" else "--",
                                label=f"{layout}: {name}")
    title = plot_title([dict(row, impl=row["layout"]) for row in rows], when).replace("world size", "ranks")
    handles, labels = bytes_axis.get_legend_handles_labels()
    for handle, label in zip(handles, labels):  # the bytes' labels join the time axis' in one legend
        time_axis.plot([], [], color=handle.get_color(), marker=handle.get_marker(),
                       linestyle=handle.get_linestyle(), label=label)
    _finish_figure(plt, figure, (time_axis, bytes_axis), rows, path,
                   title.replace("tpmoe bench:", "tpmoe bench --ep:") + (f"\n{subtitle}" if subtitle else ""),
                   order=lambda label: label.startswith("flagged"))
