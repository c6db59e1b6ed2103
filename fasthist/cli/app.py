"""The ``fasthist`` parser and entry point: common options, one subparser per command,
exit statuses and one-line errors.

Nothing heavy is imported at the top of this module (nor by ``import fasthist``): torch,
the tasks and matplotlib are imported inside :func:`main`, so that Ctrl-C at any moment
after the interpreter has started ends the same way, ``fasthist: interrupted`` and status
130, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from .. import __version__
from .args import Parser, UsageError, nonneg_int, out_path, positive_int

__all__ = ["COMMANDS", "build_parser", "command", "main", "task_options"]

#: Subcommand name -> its module in this package (``add_parser(sub, parents)``, ``run(args) -> int``).
COMMANDS = {"eps-range": "eps_range", "sweep": "sweep", "bench": "bench", "check": "check", "staleness": "staleness"}

#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


def command(name: str) -> ModuleType:
    """The module of subcommand ``name``."""
    return importlib.import_module(f".{COMMANDS[name]}", __package__)


def task_options(default: str = "digits", choices: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The options of a command that runs a task (``--task``, ``--seed``, ``--out``,
    ``--no-figures``), a fresh parent parser per command: argparse shares a parent's actions
    with every child, so one command's default must not be set on another's."""
    from ..tasks import TASKS

    task = Parser(add_help=False)
    task.add_argument("--task", default=default, choices=choices or TASKS, help=f"embedded task (default: {default})")
    task.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: 0)")
    task.add_argument(
        "--out",
        type=out_path,
        default=None,
        help="output folder, created if missing (default: ./fasthist-out/TASK, one folder per task); the run's "
        "files replace a previous run's there all at once, at the end",
    )
    task.add_argument(
        "--no-figures", action="store_true", help="write the JSON only, no PNG figures (removes a previous run's)"
    )
    return task


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads for torch (default: 1; more threads than free cores make every small op wait "
        "for a descheduled thread)",
    )
    task = task_options()

    parser = Parser(
        prog="fasthist",
        description="An optimizer's ε from histograms of the value it is added to (Silva & Rodriguez, 2024).",
    )
    parser.add_argument("--version", action="version", version=f"fasthist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    command("eps-range").add_parser(sub, [task, common])
    command("sweep").add_parser(sub, [task, common])
    command("bench").add_parser(sub, [common])
    command("check").add_parser(sub, [common])
    command("staleness").add_parser(sub, [task_options("gpt", ("gpt", "charlm")), common])
    return parser


#: Exit status after SIGTERM (128 + SIGTERM, as a shell reports it).
TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM, raised where the run is (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` takes it for a failure): the ``with`` blocks unwind, the staging
    folder goes, the previous run's files stay."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``fasthist`` with ``argv`` (default: ``sys.argv[1:]``) and returns the exit status.

    Ctrl-C ends with "fasthist: interrupted" and 130, SIGTERM with "fasthist: terminated"
    and 143, the previous run's files untouched; once the outputs are in place both are
    ignored (the run is complete). Called with ``argv`` (from Python), the signal handlers
    are restored on return; as the program (``argv`` None) they stay ignored on the way out,
    so an interrupt after the last line cannot become a traceback."""
    previous = _install_sigterm()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print("fasthist: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Terminated:
        _ignore_further_interrupts()
        print("fasthist: terminated", file=sys.stderr)
        return TERMINATED
    finally:
        if argv is not None and previous is not None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _install_sigterm() -> dict[int, Any] | None:
    """SIGTERM raises :class:`Terminated`; returns the SIGINT and SIGTERM handlers to restore
    (None outside the main thread, where handlers cannot be set)."""
    try:
        previous = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:
        return None
    return previous


def _ignore_further_interrupts() -> None:
    # We are on our way out: a second Ctrl-C (or a SIGTERM) while the message is printed or
    # the interpreter shuts down must not turn the clean exit into a traceback.
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: no handlers to change
        pass


def _interrupted(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in ``e``'s chain (matplotlib, for one, can catch one
    mid-draw and raise a ValueError from it)."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, KeyboardInterrupt):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    previous_threads = torch.get_num_threads()
    # With more threads than free cores, every small op waits for a descheduled thread:
    # on a busy 2-core machine 2 threads made LSTM steps 80x and `bench` 16x slower than 1.
    torch.set_num_threads(args.threads)
    try:
        return command(args.command).run(args)
    except UsageError as e:
        print(f"fasthist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if _interrupted(e):  # a library turned our KeyboardInterrupt into its own error
            raise KeyboardInterrupt from e
        if os.environ.get("FASTHIST_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"fasthist {args.command}: error: {msg} ({type(e).__name__}; FASTHIST_DEBUG=1 for details)", file=sys.stderr
        )
        return 1
    finally:
        torch.set_num_threads(previous_threads)
