"""Formatting and output shared by the subcommands of ``fasthist``: numbers, plain-text
tables, the JSON result file, the figures and the closing "wrote ..." line."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import __version__
from .args import UsageError

__all__ = [
    "Outputs",
    "decades",
    "deferred_interrupt",
    "draw_figures",
    "json_safe",
    "json_text",
    "out_folder",
    "prepare_out",
    "report_written",
    "sci",
    "table",
]


def json_safe(x: Any) -> Any:
    """JSON-safe: NaN and infinities become null (in dicts, lists and tuples too)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def json_text(data: dict[str, Any]) -> str:
    """The JSON of a result file (NaN and infinities as null), newline-terminated."""
    return json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"


def out_folder(args: Any) -> Path:
    """``--out``, or ``fasthist-out/TASK`` by default: one folder per task, so that a run on
    another task never overwrites this one's results."""
    return Path(args.out) if args.out is not None else Path("fasthist-out") / args.task


def prepare_out(folder: str | Path) -> Path:
    """``--out``, before any work: created when missing (with its parents); UsageError
    when it is a file, or cannot be created or written into."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {folder}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fasthist-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out {folder}: not writable ({e.strerror or e})") from None
    return out


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Ctrl-C (SIGINT) inside the block is held until it ends, then raised as
    KeyboardInterrupt; outside the main thread (no signal handlers there) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if got:
        raise KeyboardInterrupt


class Outputs:
    """The files of one run, written into a staging folder inside ``folder`` and moved into
    place together by :meth:`commit`: a run's outputs are all new, or (after an error or
    Ctrl-C before the commit) the previous run's are left exactly as they were.

    ``names`` are every file the command can write; those this run did not write (figures
    under ``--no-figures``) are removed at the commit, so the folder never mixes two runs.
    Other files in ``folder`` are not touched. The renames run with Ctrl-C held back; only a
    crash of the machine or a SIGKILL during them (microseconds) can leave a mix.

    As a context manager (``with Outputs(folder, names) as outputs:``) it commits when the
    block ends normally and discards the staging folder however it ends.
    """

    def __init__(self, folder: Path, names: Sequence[str]) -> None:
        self.folder = folder
        self.names = list(names)
        self.stage = Path(tempfile.mkdtemp(prefix=".fasthist-staging-", dir=folder))
        self.written: list[str] = []

    def path(self, name: str) -> str:
        """Where to write ``name`` (in the staging folder); recorded as written."""
        if name not in self.names:
            raise ValueError(f"{name!r} is not one of this command's outputs {self.names}")
        if name not in self.written:
            self.written.append(name)
        return str(self.stage / name)

    def write_result(self, name: str, command: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Writes ``{"fasthist_version", "command", **fields}`` as JSON and returns what was
        written, as ``json.load`` would read it back."""
        text = json_text({"fasthist_version": __version__, "command": command, **fields})
        Path(self.path(name)).write_text(text, encoding="utf-8")
        return json.loads(text)

    def commit(self) -> None:
        with deferred_interrupt():
            for name in self.written:
                os.replace(self.stage / name, self.folder / name)
            for name in self.names:
                if name not in self.written:
                    (self.folder / name).unlink(missing_ok=True)
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Commits when the block ends normally; the staging folder goes in every case."""
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()


def draw_figures(outputs: Outputs, draw: Sequence[tuple[str, Callable[[str], Any]]], skip: bool = False) -> list[str]:
    """Runs ``fn(path)`` per figure (into ``outputs``) and returns the names drawn; without
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
        fn(outputs.path(name))
        written.append(name)
    return written


def report_written(folder: str | Path, names: Sequence[str], t_start: float) -> None:
    """The closing line: the files written and the seconds since ``t_start`` (everything:
    the work, the figures and the writing)."""
    total = time.perf_counter() - t_start
    print(f"wrote {', '.join(str(Path(folder) / f) for f in names)}  ({total:.1f} s in all)")


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
