"""How far a benchmark row can be trusted: the spread of its samples, and flags for a row whose
spread is wide or whose time is faster than a yardstick allows (`tpmoe bench`, `--ep`).

A row carries min / median / max and the quartiles of its samples (ms). Flags:
  wide           IQR > WIDE_IQR x median, or max > WIDE_MAX_OVER_MIN x min. 10%: the ratios the
                 results page reports are read to about 10% (e.g. 0.85 vs 1.00); when the middle
                 half of a row's samples is wider than that, its median can move by as much
                 between two runs. 2x: one sample twice the fastest means the machine was taken
                 away for a while (on this project's shared 2-core VM under load, T = 1 samples
                 spanned 9.6 to 34 ms with 2 threads against 0.78 to 1.1 ms with 1: benchmarks/RESULTS.md).
  beats ceiling  faster than the dense GEMM of the same FLOPs by more than the noise
  beats floor    faster than one read of the weights it must read, by more than the noise
The noise of a ratio of two medians: the sum of the two rows' relative IQRs, at least
MIN_NOISE (timer and clock jitter of a quiet machine). A contender beating a yardstick measured
in the same interleaved rounds (tpmoe.cli.timing) means the samples are not comparable (threads
fighting another job, a CPU frequency change), not that the block beat the hardware.
"""
from typing import Dict, List, Optional

from .machine import load_text
from .timing import Timing

WIDE_IQR = 0.10
WIDE_MAX_OVER_MIN = 2.0
MIN_NOISE = 0.05
SPREAD_FIELDS = ("min_ms", "median_ms", "max_ms", "q1_ms", "q3_ms", "samples", "flags")
FLAG_TEXT = {"wide": "wide", "beats_ceiling": "beats ceiling", "beats_floor": "beats floor"}


def relative_iqr(timing: Timing) -> float:
    first, third = timing.quartiles_s
    return (third - first) / timing.median_s if timing.median_s > 0 else 0.0


def spread_fields(timing: Timing) -> Dict:
    """The JSON fields of a row's spread, in ms (flags filled by row_flags)."""
    first, third = timing.quartiles_s
    return dict(min_ms=timing.min_s * 1e3, median_ms=timing.median_ms, max_ms=timing.max_s * 1e3,
                q1_ms=first * 1e3, q3_ms=third * 1e3, samples=timing.repeats)


def is_wide(timing: Timing) -> bool:
    return (relative_iqr(timing) > WIDE_IQR
            or (timing.min_s > 0 and timing.max_s / timing.min_s > WIDE_MAX_OVER_MIN))


def beats(timing: Timing, yardstick: Timing) -> bool:
    """timing's median faster than yardstick's by more than the noise of the two."""
    noise = max(MIN_NOISE, relative_iqr(timing) + relative_iqr(yardstick))
    return yardstick.median_s / timing.median_s > 1 + noise


def row_flags(timing: Timing, ceiling: Optional[Timing] = None, floor: Optional[Timing] = None) -> List[str]:
    """The flags of one contender's timing (a yardstick's own row: only "wide")."""
    flags = ["wide"] if is_wide(timing) else []
    if ceiling is not None and beats(timing, ceiling):
        flags.append("beats_ceiling")
    if floor is not None and beats(timing, floor):
        flags.append("beats_floor")
    return flags


def flag_cell(row: Dict) -> str:
    """The table's marker: '' for a clean row."""
    return ", ".join(FLAG_TEXT[flag] for flag in row.get("flags", ()))


def stability_advice(rows: List[Dict]) -> Optional[str]:
    """One line when any row is flagged, else None."""
    flagged = [row for row in rows if row.get("flags")]
    if not flagged:
        return None
    load = load_text()
    # Threads that wait at a barrier for a core another job holds are the usual cause (issue 30:
    # 21 ms with the default threads against 0.63 ms with --threads 1, on a busy machine).
    threads = "" if all(row.get("threads") == 1 for row in rows) else \
        "--threads 1 (or fewer threads than idle cores), "
    return (f"unstable: {len(flagged)} of {len(rows)} rows flagged; for a stable figure rerun with "
            f"{threads}--repeats 20, on a quiet machine" + (f" ({load} at the end of this run)" if load else ""))


LEGEND = (f"flags: wide = IQR > {WIDE_IQR:.0%} of the median or max > {WIDE_MAX_OVER_MIN:g}x min; "
          "beats ceiling / floor = faster than the dense GEMM / the weight read (timed in the same rounds) "
          "beyond the noise: not a real speed")
