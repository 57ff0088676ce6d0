"""Plain-text tables for the terminal (no dependency)."""
from typing import Dict, List, Optional, Sequence


def format_cell(value, spec: Optional[str] = None) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def format_table(rows: List[Dict], columns: Sequence[str], formats: Optional[Dict[str, str]] = None,
                 headers: Optional[Dict[str, str]] = None) -> str:
    """Left-aligned text columns, numbers right-aligned; None prints as '-'."""
    formats, headers = formats or {}, headers or {}
    cells = [[headers.get(column, column) for column in columns]]
    numeric = [all(isinstance(row.get(column), (int, float)) or row.get(column) is None for row in rows)
               for column in columns]
    for row in rows:
        cells.append([format_cell(row.get(column), formats.get(column)) for column in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for index, line in enumerate(cells):
        parts = [cell.rjust(width) if numeric[i] and index > 0 else cell.ljust(width)
                 for i, (cell, width) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)
