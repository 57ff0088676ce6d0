"""What a run writes: tables (aligned text for the terminal, or Markdown for
benchmarks/RESULTS.md and summaries; no dependency) and JSON files."""
import json
import os
from dataclasses import asdict, is_dataclass
from typing import Dict, List, Optional, Sequence


def format_cell(value, spec: Optional[str] = None) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def format_table(rows: List[Dict], columns: Sequence[str], formats: Optional[Dict[str, str]] = None,
                 headers: Optional[Dict[str, str]] = None, markdown: bool = False) -> str:
    """The `columns` of `rows` (dicts), cells formatted by `formats` (column -> format spec),
    headed by `headers` (column -> title; default the column's name); None prints as '-'.
    Text columns left-aligned, numeric ones right-aligned; markdown: a Markdown table."""
    formats, headers = formats or {}, headers or {}
    cells = [[headers.get(column, column) for column in columns]]
    numeric = [all(isinstance(row.get(column), (int, float)) or row.get(column) is None for row in rows)
               for column in columns]
    for row in rows:
        cells.append([format_cell(row.get(column), formats.get(column)) for column in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    aligned = [[cell.rjust(width) if numeric[i] and index > 0 else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(line, widths))] for index, line in enumerate(cells)]
    if markdown:
        rule = "|" + "|".join("-" * (width + 1) + (":" if right else "-") for width, right in zip(widths, numeric)) + "|"
        lines = ["| " + " | ".join(line) + " |" for line in aligned]
        return "\n".join([lines[0], rule] + lines[1:])
    lines = ["  ".join(line).rstrip() for line in aligned]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths)] + lines[1:])


def write_json(path: str, payload) -> None:
    """payload as indented JSON (dataclasses as dicts, anything else JSON lacks as its str),
    creating the file's folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1,
                  default=lambda value: asdict(value) if is_dataclass(value) else str(value))


def first_line(error: BaseException, width: int = 120) -> str:
    """The first line of an error's message, cut to `width`: a note a table run prints and goes on."""
    lines = str(error).splitlines()
    return (lines[0] if lines else "")[:width]
