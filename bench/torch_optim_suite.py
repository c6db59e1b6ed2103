"""Run PyTorch's own ``test/test_optim.py`` (``TestOptimRenewed``, CPU) with fasthist substituted.

PyTorch's file is not part of this repository: give the path of a copy of it::

    python bench/torch_optim_suite.py /tmp/torch_suite/test_optim.py [-k EXPR] [--json OUT]
    python bench/torch_optim_suite.py /tmp/torch_suite/test_optim.py --torch   # baseline

Before ``torch.testing._internal.common_optimizers`` is imported, ``torch.optim.Adam``,
``AdamW``, ``RMSprop`` and ``Adagrad`` (and the same names in ``torch.optim.adam``,
``torch.optim.adamw``, ``torch.optim.rmsprop``, ``torch.optim.adagrad``) are replaced by
fasthist's classes, so ``optim_db`` (and every test it parametrises) holds fasthist's classes.
``optim_db`` is then cut down, in place, to those four optimizers. With ``--torch`` nothing is
replaced: the same selection runs torch's own classes, the baseline that tells a mismatch
between the copy of ``test_optim.py`` and the installed torch from a fasthist defect.

The copy of ``test_optim.py`` may come from another torch commit than the installed one. The
one mismatch handled here: files since early 2024 import ``TestOptim``, ``TestLRScheduler`` and
friends from sibling files (``test/optim/*.py``) that a lone copy lacks; those modules are
stood in for by empty, non-collected classes (only ``TestOptimRenewed`` runs). Anything else
that differs shows up as a failure of the ``--torch`` baseline.

Extra arguments go to pytest unchanged (``-k``, ``-x``, ``--timeout``...). Prints one line per
test (outcome and, for a failure, the first line of its error) and the counts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import types
from pathlib import Path

import torch

#: The optimizers fasthist replaces: torch's module that defines each, by class name.
REPLACED = {"Adam": "adam", "AdamW": "adamw", "RMSprop": "rmsprop", "Adagrad": "adagrad"}

#: Sibling test modules that test_optim.py of early 2024 imports, with the classes it takes.
SIBLINGS = {
    "optim.test_optim": ("TestOptim", "TestDifferentiableOptimizer"),
    "optim.test_lrscheduler": ("TestLRScheduler",),
    "optim.test_swa_utils": ("TestSWAUtils",),
}

_NAME = re.compile(r"^(?P<test>test_\w+?)_(?P<optim>" + "|".join(REPLACED) + r")_cpu_(?P<dtype>\w+)$")


def substitute() -> dict[str, type]:
    """Replace torch's four classes by fasthist's, in ``torch.optim`` and their own modules."""
    import importlib

    import fasthist  # before anything is replaced: fasthist's classes subclass torch's

    ours = {name: getattr(fasthist, name) for name in REPLACED}
    for name, module in REPLACED.items():
        setattr(torch.optim, name, ours[name])
        setattr(importlib.import_module(f"torch.optim.{module}"), name, ours[name])
    return ours


def stand_in_siblings(source: str) -> list[str]:
    """Empty modules for the sibling test files a lone copy of test_optim.py imports."""
    stood_in = []
    for module, classes in SIBLINGS.items():
        if f"from {module} import" not in source or module in sys.modules:
            continue
        package = sys.modules.setdefault("optim", types.ModuleType("optim"))
        package.__path__ = []
        stub = types.ModuleType(module)
        for cls in classes:
            setattr(stub, cls, type(cls, (), {"__test__": False}))
        sys.modules[module] = stub
        stood_in.append(module)
    return stood_in


def restrict_optim_db(expected: dict[str, type] | None) -> list[str]:
    """Cut ``optim_db`` to the four optimizers, in place (test_optim.py imports the same list)."""
    from torch.testing._internal.common_optimizers import optim_db

    kept = [info for info in optim_db if info.optim_cls.__name__ in REPLACED]
    optim_db[:] = kept
    for info in kept:
        cls = info.optim_cls
        if expected is not None and cls is not expected[cls.__name__]:
            raise SystemExit(f"optim_db holds {cls.__module__}.{cls.__qualname__}, not fasthist's class")
    return [f"{info.optim_cls.__module__}.{info.optim_cls.__qualname__}" for info in kept]


class Outcomes:
    """A pytest plugin that keeps each test's outcome and the first line of its error."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, str]] = {}

    def pytest_runtest_logreport(self, report) -> None:  # noqa: ANN001 (pytest's TestReport)
        name = report.nodeid.rsplit("::", 1)[-1]
        if report.when == "call" or report.outcome != "passed":
            reason = ""
            if report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)  # torch appends a repro hint: keep line 1
                reason = (crash.message if crash else str(report.longrepr)).strip().splitlines()[0]
            elif report.skipped and isinstance(report.longrepr, tuple):
                reason = report.longrepr[2]
            if name not in self.rows or self.rows[name][0] == "passed":
                self.rows[name] = (report.outcome, reason)


def summarise(rows: dict[str, tuple[str, str]]) -> dict[str, int]:
    """Print one line per test (test, optimizer, dtype, outcome, reason) and return the counts."""
    counts: dict[str, int] = {}
    for name in sorted(rows, key=lambda n: (_NAME.sub(r"\g<test>", n), n)):
        outcome, reason = rows[name]
        counts[outcome] = counts.get(outcome, 0) + 1
        match = _NAME.match(name)
        test, optim, dtype = match.group("test", "optim", "dtype") if match else (name, "-", "-")
        print(f"{outcome:8} {test:58} {optim:8} {dtype:10} {reason[:160]}")
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())), f"total={sum(counts.values())}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a copy of PyTorch's test/test_optim.py")
    parser.add_argument("--torch", action="store_true", help="baseline: run torch's own classes")
    parser.add_argument("--json", type=Path, help="write {test: [outcome, reason]} here")
    args, pytest_args = parser.parse_known_args(argv)
    import pytest

    if "torch.testing._internal.common_optimizers" in sys.modules:
        raise SystemExit("common_optimizers was imported before the substitution: optim_db holds torch's classes")
    ours = None if args.torch else substitute()
    stood_in = stand_in_siblings(args.path.read_text())
    kept = restrict_optim_db(ours)
    print(f"torch {torch.__version__} (git {torch.version.git_version[:8]}); file {args.path}")
    print(f"optim_db: {', '.join(kept)}; stood in: {', '.join(stood_in) or 'nothing'}")
    sys.argv = sys.argv[:1]  # torch's test utilities read sys.argv; these arguments are not theirs
    outcomes = Outcomes()
    node = f"{args.path.resolve()}::TestOptimRenewedCPU"
    started = time.perf_counter()
    code = pytest.main(
        [node, "-q", "-p", "no:cacheprovider", f"--rootdir={args.path.resolve().parent}", *pytest_args],
        plugins=[outcomes],
    )
    print(f"pytest exit {int(code)} after {time.perf_counter() - started:.0f} s")
    summarise(outcomes.rows)
    if args.json:
        args.json.write_text(json.dumps(outcomes.rows, indent=1, sort_keys=True))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
