"""The bench's PNG: time per step and throughput against tokens, one line per implementation
and world size (log-log). matplotlib is an optional extra (`pip install 'tpmoe[plot]'`)."""
from typing import Dict, List

from . import UsageError


class PlottingUnavailable(UsageError):
    """--plot without matplotlib: said before the bench runs."""


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlottingUnavailable("--plot: needs matplotlib, which is not installed "
                                  "(pip install 'tpmoe[plot]' or pip install matplotlib)") from None


def plot_rows(rows: List[Dict], path: str, title: str = "") -> None:
    check_plotting()
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    series = {}
    for row in rows:
        series.setdefault((row["impl"], row["world_size"]), []).append((row["tokens"], row["median_ms"], row["gflops"]))
    impls = sorted({impl for impl, _ in series})
    colors = {impl: plt.get_cmap("tab10")(index % 10) for index, impl in enumerate(impls)}
    line_styles = ["-", "--", ":", "-."]
    figure, (time_axis, throughput_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (impl, world_size), points in sorted(series.items()):
        points.sort()
        tokens = [p[0] for p in points]
        # Colour: the implementation; line style: the world size; yardsticks thin.
        style = dict(color=colors[impl], marker="o", markersize=4, linestyle=line_styles[(world_size - 1) % 4],
                     linewidth=1.0 if impl in ("dense", "floor") else 2.0, label=f"{impl} P={world_size}")
        time_axis.plot(tokens, [p[1] for p in points], **style)
        throughput_axis.plot(tokens, [p[2] for p in points], **style)
    for axis, ylabel in ((time_axis, "ms per step (median)"), (throughput_axis, "block GFLOP/s")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("tokens")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    throughput_axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
