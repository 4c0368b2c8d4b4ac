"""Tables a lab run reports: printed at the end of the run and written to a file.

A test adds rows with `row(table, **columns)`; at the end of the session conftest.py prints
every table (Markdown, in the form docs/p2p.md uses) in pytest's terminal summary and writes
it to `<pytest's base temp dir>/<table>.md` (the path is printed too), so that a run's numbers
can be pasted into the documentation.
"""

from __future__ import annotations

# table name -> (column order, rows)
_TABLES: dict[str, tuple[list[str], list[dict]]] = {}


def row(table: str, **columns) -> None:
    """Adds a row to `table`; the first row's keys fix the columns, in their order."""
    header, rows = _TABLES.setdefault(table, (list(columns), []))
    for key in columns:
        if key not in header:
            header.append(key)
    rows.append(columns)


def tables() -> dict[str, str]:
    """Every table so far, as Markdown."""
    out = {}
    for name, (header, rows) in _TABLES.items():
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(key)) for key in header) + " |")
        out[name] = "\n".join(lines) + "\n"
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}"
    return str(value)
