"""The bench's trust marks (tpmoe.cli.spread): a row's spread fields come from its samples, a
wide row and a row faster than a yardstick are flagged, a clean row is not, and the run's last
line says how to get a stable figure only when something is flagged."""
import statistics

from tpmoe.cli.spread import SPREAD_FIELDS, flag_cell, row_flags, spread_fields, stability_advice
from tpmoe.cli.timing import Timing, time_calls_interleaved


def timing(*samples_ms):
    samples = [ms * 1e-3 for ms in samples_ms]
    return Timing(statistics.median(samples), min(samples), len(samples), samples)


DENSE = timing(10.0, 10.1, 10.2, 10.3, 10.4)
FLOOR = timing(4.0, 4.0, 4.1, 4.1, 4.2)


def test_spread_fields_from_the_samples():
    fields = spread_fields(timing(5.0, 1.0, 3.0, 2.0, 4.0))
    assert fields == dict(min_ms=1.0, median_ms=3.0, max_ms=5.0, q1_ms=2.0, q3_ms=4.0, samples=5)
    assert set(fields) | {"flags"} == set(SPREAD_FIELDS)


def test_clean_row_is_not_flagged():
    clean = timing(20.0, 20.4, 20.8, 21.0, 21.5)  # 2x the ceiling's time, IQR 3% of the median
    assert row_flags(clean, DENSE, FLOOR) == []
    assert stability_advice([dict(impl="tpmoe", flags=[])]) is None


def test_wide_row_is_flagged():
    by_iqr = timing(10.0, 10.0, 12.0, 14.0, 14.0)  # IQR 4 ms = 33% of the median
    by_outlier = timing(20.0, 20.0, 20.0, 20.0, 45.0)  # IQR 0, but one sample 2.25x the fastest
    assert row_flags(by_iqr) == ["wide"]
    assert row_flags(by_outlier, DENSE, FLOOR) == ["wide"]
    # 8% IQR is under the 10% threshold: not wide.
    assert row_flags(timing(25.0, 25.0, 26.0, 27.0, 27.0)) == []


def test_row_faster_than_the_yardsticks_is_flagged():
    # The case: "of limit" 2.54, a contender 2.5x faster than the dense ceiling.
    impossible = timing(4.0, 4.0, 4.1, 4.1, 4.2)
    assert row_flags(impossible, DENSE, FLOOR) == ["beats_ceiling"]
    under_floor = timing(2.0, 2.0, 2.0, 2.0, 2.0)
    assert row_flags(under_floor, DENSE, FLOOR) == ["beats_ceiling", "beats_floor"]
    row = dict(impl="tpmoe", flags=row_flags(under_floor, DENSE, FLOOR))
    assert flag_cell(row) == "beats ceiling, beats floor"


def test_ties_with_a_yardstick_within_the_noise_are_not_flagged():
    # 4% faster than the ceiling: inside the 5% minimum noise.
    assert row_flags(timing(9.8, 9.8, 9.9, 9.9, 10.0), DENSE, None) == []
    # 20% faster than a ceiling whose own IQR is 33% of its median: noise, not a claim.
    noisy_ceiling = timing(8.0, 10.0, 12.0, 14.0, 16.0)
    noisy_row = timing(9.7, 9.9, 10.0, 10.1, 10.3)
    assert row_flags(noisy_row, noisy_ceiling, None) == []


def test_advice_is_one_line_naming_the_remedies():
    rows = [dict(impl="tpmoe", flags=["wide"]), dict(impl="dense", flags=[]), dict(impl="floor", flags=[])]
    advice = stability_advice(rows)
    assert "\n" not in advice and advice.startswith("unstable: 1 of 3 rows flagged")
    assert "--threads 1" in advice and "--repeats" in advice and "quiet machine" in advice
    # Already one thread per rank: the advice does not repeat it.
    one_thread = stability_advice([dict(row, threads=1) for row in rows])
    assert "--threads" not in one_thread and "--repeats" in one_thread


def test_yardsticks_are_timed_in_the_contenders_rounds(monkeypatch):
    """bench_rank hands tpmoe, the dense ceiling and the read floor to ONE interleaved timing
    call per token count (so they sample the same moments of the machine), and every row's
    flags compare it with the yardsticks of that same call."""
    import torch

    import tpmoe.cli.bench as bench
    from tpmoe.cli.launch import RankContext
    from tpmoe.presets import get_preset

    calls = []

    def recording(steps, **options):
        calls.append(list(steps))
        return time_calls_interleaved(steps, **options)
    monkeypatch.setattr(bench, "time_calls_interleaved", recording)
    preset = get_preset("tiny")
    plan = bench.BenchPlan(preset=preset.name, family=preset.family, config=preset.config, scale=1.0, world_size=1,
                           tokens=(1, 4), impls=("tpmoe", "dense", "floor"), mode="fwd", dtype=torch.float32,
                           repeats=2, warmup=0, threads=torch.get_num_threads())
    context = RankContext(0, 1, None, torch.device("cpu"), None, "in-process", lambda message: None)
    rows = bench.bench_rank(context, plan)
    assert calls == [["tpmoe", "dense", "floor"]] * 2
    assert {(row["impl"], row["tokens"]) for row in rows} == {(i, t) for i in ("tpmoe", "dense", "floor") for t in (1, 4)}
    for row in rows:
        assert row["samples"] == 2 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
