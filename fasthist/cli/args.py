"""Argument types and checks shared by the subcommands of ``fasthist``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

__all__ = [
    "Parser",
    "UsageError",
    "eps_list",
    "nonneg_float",
    "nonneg_int",
    "out_path",
    "positive_float",
    "positive_int",
    "resolve_device",
]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """A bad argument found after parsing (exit status 2)."""


def eps_list(text: str) -> list[float]:
    """argparse type: comma-separated positive finite numbers, sorted, without repeats."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"invalid ε list {text!r}: expected comma-separated numbers like 1e-8,1e-7")
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid ε list {text!r}: {p!r} is not a number") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"invalid ε list {text!r}: {p!r} is not a positive finite number")
        values.append(v)
    return sorted(set(values))


def out_path(text: str) -> str:
    """argparse type for ``--out``: a non-empty path. An empty one would mean the current
    folder, whose files of the same names a run replaces or removes."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"invalid output folder {text!r}: an empty path means the current folder, where a run "
            "replaces or removes files; give a folder (--out . if you mean the current one)"
        )
    return text


def _number(cast: type, low: float, inclusive: bool, what: str) -> Callable[[str], float]:
    """argparse type: ``cast(text)``, finite and above ``low`` (or equal, if inclusive)."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}") from None
        if not (math.isfinite(v) and (v >= low if inclusive else v > low)):
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}")
        return v

    return parse


positive_int = _number(int, 0, False, "positive integer")
nonneg_int = _number(int, 0, True, "non-negative integer")
positive_float = _number(float, 0.0, False, "positive number")


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0 ("invalid number" when it does not parse)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"invalid non-negative number {text!r}")
    return v


def resolve_device(name: str) -> str:
    """``--device``: ``cpu``, or ``cuda``/``cuda:N`` when a GPU is available (else :class:`UsageError`)."""
    import torch  # here, not at the top: the command must catch Ctrl-C during this import

    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available (torch.cuda.is_available() is False)")
        return name
    raise UsageError(f"--device {name!r}: expected cpu or cuda")
