"""Formatting and output shared by the subcommands of ``fasthist``: numbers, plain-text
tables, the JSON result file, the figures and the closing "wrote ..." line."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__

__all__ = ["decades", "draw_figures", "json_safe", "report_written", "sci", "table", "write_result"]


def json_safe(x: Any) -> Any:
    """JSON-safe: NaN and infinities become null (in dicts, lists and tuples too)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_result(folder: str | Path, name: str, command: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Writes ``{"fasthist_version", "command", **fields}`` to ``folder/name`` (the folder is
    created) and returns what was written, as ``json.load`` would read it back."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data = {"fasthist_version": __version__, "command": command, **fields}
    text = json.dumps(json_safe(data), indent=2, allow_nan=False)
    (out / name).write_text(text + "\n", encoding="utf-8")
    return json.loads(text)


def draw_figures(folder: str | Path, draw: Sequence[tuple[str, Callable[[str], Any]]], skip: bool = False) -> list[str]:
    """Runs ``fn(str(folder / name))`` per figure and returns the names drawn; without
    matplotlib, says so once on stderr and draws none."""
    if skip:
        return []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fasthist: matplotlib is not installed; figures skipped (pip install -e '.[demo]')", file=sys.stderr)
        return []
    written = []
    for name, fn in draw:
        fn(str(Path(folder) / name))
        written.append(name)
    return written


def report_written(folder: str | Path, names: Sequence[str], t_start: float) -> None:
    """The closing line: the files written and the seconds since ``t_start``."""
    total = time.perf_counter() - t_start
    print(f"wrote {', '.join(str(Path(folder) / f) for f in names)}  ({total:.1f} s)")


def sci(x: float | None) -> str:
    """``1.23e-08``, or ``-`` for None, NaN and infinities."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.2e}"


def decades(values: Sequence[float]) -> str:
    """``1e-08 1e-07 ...``"""
    return " ".join(f"{v:.0e}" for v in values)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A plain-text table: a header, a rule, the rows; ``align`` has one ``l`` or ``r`` per column."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
