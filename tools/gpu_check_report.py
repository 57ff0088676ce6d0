"""What tools/gpu_check.py makes of its steps' outputs: pytest's junit XML, the bench's JSON,
the verdicts (PASS / FAIL / SKIP with the reason) and summary.md."""
import os
import xml.etree.ElementTree as ElementTree
from collections import Counter


def tail(log_dir, name, lines=30, width=300):
    """The telling line at the end of logs/<name>.log: the last one naming an error, else the last."""
    path = os.path.join(log_dir, f"{name}.log")
    if not os.path.exists(path):
        return "(no log)"
    with open(path, errors="replace") as handle:
        last = [line.strip() for line in handle.read().splitlines() if line.strip()][-lines:]
    errors = [line for line in last if "Error" in line or "error:" in line or "FAILED" in line]
    chosen = (errors or last or ["(empty log)"])[-1]
    return chosen[:width]


def parse_junit(path):
    """Counts per outcome and per test file, the failures (with their messages) and the skip reasons."""
    counts = Counter()
    files = {}
    failures = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test_file = case.get("classname", "").replace(".", "/") + ".py"
        name = f"{test_file}::{case.get('name')}"
        entry = files.setdefault(test_file, dict(passed=0, failed=0, skipped=0, skip_reasons={}))
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            kind = "passed"
        elif outcome.tag == "skipped":
            kind = "skipped"
            reason = (outcome.get("message") or "").removeprefix("Skipped: ")
            entry["skip_reasons"][reason] = entry["skip_reasons"].get(reason, 0) + 1
        else:
            kind = "failed"
            failures.append(dict(test=name, kind=outcome.tag, message=(outcome.get("message") or "")[:500]))
        counts[kind] += 1
        entry[kind] += 1
    return dict(counts=dict(passed=counts["passed"], failed=counts["failed"], skipped=counts["skipped"]),
                files=files, failures=failures)


def _file_verdict(entry):
    if entry["failed"]:
        return f"FAIL {entry['failed']} failed"
    if entry["passed"] == 0 and entry["skipped"]:
        reason = max(entry["skip_reasons"], key=entry["skip_reasons"].get)
        return f"SKIP {entry['skipped']} skipped ({reason})"
    return f"PASS {entry['passed']}" + (f", {entry['skipped']} skipped" if entry["skipped"] else "")


def pytest_verdict(exit_code, results, timeout_s, log_tail):
    if exit_code is None:
        return "FAIL", f"timed out after {timeout_s} s (what ran is in logs/tests.log)"
    if results is None:
        return "FAIL", f"pytest exited {exit_code} without a report: {log_tail}"
    counts = results["counts"]
    per_file = "; ".join(f"{os.path.basename(name)} {_file_verdict(entry)}" for name, entry in results["files"].items())
    if counts["failed"]:
        names = ", ".join(failure["test"].split("::")[-1] for failure in results["failures"][:3])
        return "FAIL", f"{counts['failed']} failed ({names}{', ...' if counts['failed'] > 3 else ''}); {per_file}"
    if exit_code != 0:
        return "FAIL", f"pytest exited {exit_code}: {log_tail}"
    if counts["passed"] == 0:
        return "SKIP", f"every test skipped; {per_file}"
    return "PASS", per_file


def bench_verdict(exit_code, payload, timeout_s, log_tail):
    rows = payload["rows"] if payload else []
    if exit_code is None:
        return "FAIL", f"timed out after {timeout_s} s with {len(rows)} rows written (logs/bench_raw.json)"
    if payload is None:
        return "FAIL", f"exited {exit_code} before writing a row: {log_tail}"
    if payload["disagreements"]:
        return "FAIL", f"{len(payload['disagreements'])} disagreement(s) with grouped_mm: {payload['disagreements'][0]}"
    if exit_code != 0 or not payload["complete"]:
        return "FAIL", f"exited {exit_code} after {len(rows)} rows: {log_tail}"
    presets = ", ".join(payload["presets"])
    skipped = "; ".join(payload["notes"])
    if payload["mode"] == "dry":
        return "PASS", (f"dry: {len(rows)} rows ({presets}; scale {payload['scale']:g}) ran on CPU under the Triton "
                        f"interpreter, untimed; every implementation agrees with grouped_mm"
                        + (f"; {skipped}" if skipped else ""))
    headline = []
    for preset in payload["presets"]:
        ours = [row for row in rows if row["preset"] == preset and row["impl"] == "tpmoe" and row["pass_"] == "fwd"]
        if ours:
            decode, largest = ours[0], ours[-1]
            headline.append(f"{preset} T={decode['T']} {decode['hbm_gbps']:.0f} GB/s, T={largest['T']} "
                            f"{largest['of_dense']:.2f} of dense")
    return "PASS", f"{len(rows)} rows; tpmoe fwd: " + "; ".join(headline) + (f"; {skipped}" if skipped else "")


def summary_markdown(summary, records, log_dir):
    lines = [f"# gpu-check: {'PASS' if summary['ok'] else 'FAIL'} ({summary['mode']}), {summary['date']}, "
             f"{summary['seconds']:.0f} s", "", "| step | verdict | seconds | cap (s) | reason |",
             "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['verdict']} | {s['seconds']:.0f} | {s['timeout_s']} | {s['reason']} |"
              for s in summary["steps"]]
    env = records["env"].get("details") or {}
    if env:
        lines += ["", "## env", ""] + [f"- {key}: {value}" for key, value in env.items()]
    ops = records["build"].get("details") or {}
    if ops:
        lines += ["", "## build", "", f"- command: `{records['build']['command']}`"]
        lines += [f"- tpmoe::{op}: {', '.join(keys) or 'no kernel'}" for op, keys in ops["kernels"].items()]
    tests = records["tests"].get("details") or {}
    if tests:
        lines += ["", "## tests", "", f"`{records['tests']['command']}`", "",
                  "| file | passed | failed | skipped | skip reasons |", "|---|---|---|---|---|"]
        for name, e in tests["files"].items():
            reasons = "; ".join(f"{count}x {reason}" for reason, count in e["skip_reasons"].items())
            lines.append(f"| {name} | {e['passed']} | {e['failed']} | {e['skipped']} | {reasons} |")
        lines += [f"- {f['kind'].upper()} {f['test']}: {f['message'].splitlines()[0] if f['message'] else ''}"
                  for f in tests["failures"]]
    bench_md = os.path.join(log_dir, "bench.md")
    if os.path.exists(bench_md):
        with open(bench_md) as handle:
            lines += ["", "## bench", "", handle.read().strip()]
    return "\n".join(lines) + "\n"
