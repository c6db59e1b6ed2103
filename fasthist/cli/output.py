"""Formatting and output shared by the subcommands of ``fasthist``: numbers, plain-text
tables, the JSON result file, the figures and the closing "wrote ..." line."""

from __future__ import annotations

import contextlib
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
from pathlib import Path
from typing import Any

from .. import __version__
from .args import UsageError

__all__ = [
    "Outputs",
    "check_out",
    "decades",
    "draw_figures",
    "ignore_interrupts",
    "interrupts_held",
    "json_safe",
    "json_text",
    "load_cpu_kernel",
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


def check_out(folder: str | Path) -> Path:
    """``--out``, checked without touching anything: an existing folder must be writable;
    a missing one must be creatable (its nearest existing parent a writable folder).
    UsageError otherwise."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {folder}: exists and is not a folder")
    parent = out
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {folder}: {parent} exists and is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {folder}: not writable ({parent} does not allow it)")
    return out


def prepare_out(folder: str | Path) -> Path:
    """``--out``, once every argument is checked: created when missing (with its parents);
    UsageError when it is a file, or cannot be created or written into."""
    out = check_out(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fasthist-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out {folder}: not writable ({e.strerror or e})") from None
    return out


#: The signals a run holds back while it commits, and ignores once its outputs are written.
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_interrupts() -> None:
    """From here on SIGINT and SIGTERM are ignored (main thread only): called once a run's
    outputs are in place, when an interrupt could stop nothing but the closing line, and
    would only turn a complete run into exit status 130 or a traceback. :func:`.app.main`
    restores the handlers when it was called with an explicit argument list."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in HELD_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then act as they would have (main thread
    only; elsewhere the block runs as is). For code an interrupt must not cut in the middle:
    matplotlib, interrupted while it lays out a figure, can leave its state broken and fail
    with an unrelated error (``Invalid affine transformation matrix``) instead of stopping.
    The wait lasts at most the block (one figure: about a second)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:  # the first one decides, as it would have without the wait
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(caught[0])


class Outputs:
    """The files of one run, written into a staging folder inside ``folder`` and moved into
    place together by :meth:`commit`: a run's outputs are all new, or (after an error or
    Ctrl-C before the commit) the previous run's are left exactly as they were.

    ``names`` are every file the command can write; those this run did not write (figures
    under ``--no-figures``) are removed at the commit, so the folder never mixes two runs.
    Other files in ``folder`` are not touched. The commit checks every destination before it
    moves anything and undoes its moves if one fails (:meth:`commit`); only a crash of the
    machine or a SIGKILL during the renames (microseconds) can leave a mix.

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
        """Moves the staged files into place, all or nothing: every destination is checked
        first (a folder where a file goes is an error before anything moves), the previous
        run's files are moved aside into the staging folder, the new ones moved in; if any
        move fails, what was moved in is removed and what was moved aside is put back.
        SIGINT and SIGTERM are ignored from the first move on (the run is then complete)."""
        for name in self.names:
            dest = self.folder / name
            if dest.is_dir() and not dest.is_symlink():
                raise OSError(f"cannot replace {dest}: it is a folder (move it away and rerun)")
        ignore_interrupts()
        aside = self.stage / ".previous"
        aside.mkdir()
        moved_aside: list[str] = []
        moved_in: list[str] = []
        try:
            for name in self.names:
                if os.path.lexists(self.folder / name):
                    os.replace(self.folder / name, aside / name)
                    moved_aside.append(name)
            for name in self.written:
                os.replace(self.stage / name, self.folder / name)
                moved_in.append(name)
        except BaseException:
            for name in moved_in:
                os.replace(self.folder / name, self.stage / name)
            for name in moved_aside:
                os.replace(aside / name, self.folder / name)
            raise
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
        with interrupts_held():
            fn(outputs.path(name))
        written.append(name)
    return written


def load_cpu_kernel(device: str, note_after: float = 0.5) -> None:
    """Loads fasthist's compiled CPU kernel before the run's work (on the CPU, unless
    ``FASTHIST_CPU_KERNEL=0``). On first use this builds it (one compiler call: 55 s measured
    on a quiet 2-core machine), which would otherwise happen silently inside the first step,
    behind a progress bar whose estimate it inflates. Loading a built library takes well
    under ``note_after`` seconds, so when it takes longer a build is under way and one line
    says so on stderr."""
    if device != "cpu":
        return
    from .. import csrc

    if not csrc.enabled():
        return
    done = threading.Event()

    def load() -> None:
        try:
            csrc.available()  # False, with one warning, where no compiler works: the run goes on
        finally:
            done.set()

    threading.Thread(target=load, name="fasthist-cpu-kernel", daemon=True).start()
    if not done.wait(note_after):
        print("building fasthist's CPU kernel (first use, about a minute on 2 cores)", file=sys.stderr, flush=True)
        done.wait()


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
