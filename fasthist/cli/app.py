"""The ``fasthist`` parser and entry point: common options, one subparser per command,
exit statuses and one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from .. import __version__
from . import bench, eps_range, sweep
from .args import Parser, UsageError, nonneg_int, positive_int

__all__ = ["COMMANDS", "build_parser", "main"]

#: Subcommand name -> its module (``add_parser(sub, parents)``, ``run(args) -> int``).
COMMANDS = {"eps-range": eps_range, "sweep": sweep, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    from ..tasks import TASKS

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
    task = Parser(add_help=False)
    task.add_argument("--task", default="digits", choices=TASKS, help="embedded task (default: digits)")
    task.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: 0)")
    task.add_argument("--out", default="fasthist-out", help="output folder (default: ./fasthist-out)")
    task.add_argument("--no-figures", action="store_true", help="write the JSON only, no PNG figures")

    parser = Parser(prog="fasthist", description="Adam's ε from histograms of sqrt(v_hat) (Silva & Rodriguez, 2024).")
    parser.add_argument("--version", action="version", version=f"fasthist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{eps-range,sweep,bench}")
    sub.required = True
    eps_range.add_parser(sub, [task, common])
    sweep.add_parser(sub, [task, common])
    bench.add_parser(sub, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``fasthist`` with ``argv`` (default: ``sys.argv[1:]``) and returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_threads = torch.get_num_threads()
    # With more threads than free cores, every small op waits for a descheduled thread:
    # on a busy 2-core machine 2 threads made LSTM steps 80x and `bench` 16x slower than 1.
    torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as e:
        print(f"fasthist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fasthist: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("FASTHIST_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"fasthist {args.command}: error: {msg} ({type(e).__name__}; FASTHIST_DEBUG=1 for details)", file=sys.stderr
        )
        return 1
    finally:
        torch.set_num_threads(previous_threads)
