"""The bench's PNG (tpmoe.cli.plot): its title names what a reader needs to compare two plots,
and it is drawn from JSON rows alone, flagged rows included, small enough to commit."""
import datetime
import importlib.util

import pytest

from tpmoe.cli.plot import plot_rows, plot_title

pytestmark = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")


def _rows():
    rows = []
    for world_size in (1, 2):
        for tokens, base in ((1, 1.0), (8, 2.0), (64, 9.0)):
            for impl, factor, flags in (("tpmoe", 1.0, []), ("hf_grouped_mm", 2.0, ["wide"]),
                                        ("dense", 0.1, []), ("floor", 0.3, [])):
                if impl == "hf_grouped_mm" and world_size > 1:
                    continue
                ms = base * factor * world_size
                rows.append(dict(preset="tiny", scale=1.0, mode="fwd", dtype="bfloat16", device="cpu",
                                 threads=2 // world_size, impl=impl, world_size=world_size, tokens=tokens,
                                 min_ms=0.9 * ms, median_ms=ms, max_ms=1.3 * ms, gflops=10.0 / ms, flags=flags,
                                 limit_ms=0.3 * base * world_size))
    return rows


def test_title_names_preset_mode_dtype_world_threads_and_date():
    title = plot_title(_rows(), datetime.datetime(2026, 12, 7, 16, 20))
    assert title == ("tpmoe bench: tiny (scale 1.0), fwd, bfloat16, world size 1..2, "
                     "threads per rank P=1: 2, P=2: 1, cpu, 2026-12-07 16:20 UTC")


def test_plot_from_rows_is_a_small_png(tmp_path):
    path = tmp_path / "bench.png"
    plot_rows(_rows(), str(path), subtitle="a CPU")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < len(data) < 100_000, len(data)  # a few tens of KB: fit to commit


def test_ep_plot_from_rows(tmp_path):
    from tpmoe.cli.plot import plot_ep_rows
    rows = [dict(preset="tiny", scale=1.0, mode="fwd", dtype="bfloat16", device="cpu", threads=1, layout=layout,
                 world_size=world_size, tokens=tokens, min_ms=ms * 0.9, median_ms=ms * 1.0, max_ms=ms * 1.2,
                 flags=["wide"] if tokens == 8 else [], bytes_per_collective=moved(tokens))
            for tokens in (1, 8, 64)
            for layout, world_size, ms, moved in (
                ("one process", 1, tokens * 1.0, lambda t: {}),
                ("tp 2", 2, tokens * 0.7, lambda t: {"all_reduce": 2 * t * 64}),
                ("ep 2", 2, tokens * 0.6, lambda t: {"all_to_all_single": 8 * t * 64 + 128}))]
    path = tmp_path / "ep.png"
    plot_ep_rows(rows, str(path), subtitle="a CPU")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < path.stat().st_size < 100_000


def test_committed_results_redraw(tmp_path, capsys):
    """Every JSON behind a plot of benchmarks/RESULTS.md redraws with benchmarks/plot_bench.py
    (bench, --ep, whole-model and AOT rows) into a PNG small enough to commit."""
    import glob
    import os
    import sys

    from support import ROOT as root
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import plot_bench

    sources = sorted(glob.glob(os.path.join(root, "benchmarks", "plots", "*.json")))
    assert len(sources) >= 4, sources
    for source in sources:
        png = tmp_path / (os.path.basename(source)[:-5] + ".png")
        plot_bench.main([source, str(png), "--date", "2026-12-07 16:00"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < png.stat().st_size < 100_000, source
        assert os.path.exists(source[:-5] + ".png"), source  # the committed PNG benchmarks/RESULTS.md links
