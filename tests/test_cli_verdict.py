"""The parts of the ``fasthist`` command that need no task data: the sweep's verdict (a pure
function), the shared progress bar, and the package's import hygiene."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fasthist.cli.sweep import summarize_runs, sweep_verdict, verdict_text
from fasthist.progress import progress_bar
from fasthist.tasks import Task, TrainResult

nan = math.nan


def runs_of(*rows):
    """EpsRuns from (eps, per-seed metrics, in_range)."""
    return [
        summarize_runs(eps, [TrainResult(eps, m, 0.5, 1, 0.1, 0.25) for m in metrics], inside)
        for eps, metrics, inside in rows
    ]


def task(higher_is_better: bool) -> Task:
    t = Task()
    t.higher_is_better = higher_is_better
    return t


def verdict(runs, higher=True, inside=None, candidates=2):
    grid = [r.eps for r in runs]
    inside = [r.eps for r in runs if r.in_range] if inside is None else inside
    t = task(higher)
    return sweep_verdict(runs, grid, inside, candidates, better=t.better, higher_is_better=t.higher_is_better)


def test_summarize_runs_mean_is_nan_when_a_seed_diverged():
    (r,) = runs_of((1e-8, [90.0, nan, 80.0], True))
    assert math.isnan(r.metric) and r.metric_min == 80.0 and r.metric_max == 90.0
    assert r.adaptive_share == 0.25 and r.final_loss == 0.5 and r.seconds == pytest.approx(0.3)


def test_single_best_outside_the_range():
    runs = runs_of((1e-8, [91.0, 93.0], False), (1e-6, [85.0, 91.0], True), (1e-4, [70.0, 72.0], True))
    v = verdict(runs, candidates=3)
    assert v.best is runs[0] and v.tied == [runs[0]] and v.tied_inside == []
    assert v.within_noise == [1e-8, 1e-6]  # 1e-6's best seed reaches the best's worst, 1e-4's does not
    assert v.best_fields() == {
        "best_eps": 1e-8,
        "best_metric": 92.0,
        "best_inside": False,
        "best_tied": [1e-8],
        "within_noise_of_best": [1e-8, 1e-6],
    }
    assert v.saved == 1 and v.narrowing == 1.0


def test_tie_is_held_by_the_range_when_any_tied_eps_is_inside():
    runs = runs_of((1e-8, [90.0, 90.0], False), (1e-6, [90.0, 90.0], True), (1e-4, [10.0, 10.0], True))
    v = verdict(runs)
    assert v.best is runs[1] and v.tied == runs[:2] and v.tied_inside == [runs[1]]
    assert v.best_fields()["best_inside"] is True and v.best_fields()["best_tied"] == [1e-8, 1e-6]


def test_lower_is_better():
    runs = runs_of((1e-9, [5.0, 6.0], True), (1e-7, [3.0, 3.5], True), (1e-5, [3.4, 9.0], False))
    v = verdict(runs, higher=False)
    assert v.best is runs[1] and v.within_noise == [1e-7, 1e-5]


def test_every_run_diverged():
    runs = runs_of((1e-8, [nan], True), (1e-3, [nan], False))
    v = verdict(runs)
    assert v.best is None and v.tied == [] and v.within_noise == []
    assert v.best_fields() == {
        "best_eps": None,
        "best_metric": None,
        "best_inside": None,
        "best_tied": [],
        "within_noise_of_best": [],
    }


def test_progress_bar_off():
    assert progress_bar(10, "x", enabled=False) is None


def test_python_dash_m_fasthist_cli():
    res = subprocess.run(
        [sys.executable, "-m", "fasthist.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.startswith("fasthist ")


def private_imports(path: Path) -> list[str]:
    """``from x import _name`` and ``module._name`` uses of another module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    bad.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
                imported.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in imported
        ):
            bad.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return bad


def test_cli_imports_no_private_name():
    root = Path(__file__).resolve().parents[1] / "fasthist"
    files = [*sorted((root / "cli").glob("*.py")), root / "progress.py", root / "estimate.py"]
    assert [b for f in files for b in private_imports(f)] == []


class Rng:
    """An EpsRange stand-in: the bounds verdict_text reads."""

    def __init__(self, low, high, without_dead=None):
        self.low, self.high, self.without_dead = low, high, without_dead


def test_verdict_text_names_every_tied_eps():
    runs = runs_of((1e-8, [90.0, 90.0], False), (1e-6, [90.0, 90.0], True), (1e-4, [10.0, 10.0], True))
    text = verdict_text(verdict(runs), Rng(1e-6, 1e-1), "accuracy", "%")
    assert (
        text == "best ε: a tie between 1e-08 1e-06 (accuracy 90.00%); inside the estimated range [1e-06, 1e-01]: 1e-06"
    )
    live = Rng(1e-5, 1e-1)
    text = verdict_text(verdict(runs), Rng(1e-8, 1e-1, without_dead=live), "accuracy", "%")
    assert text.endswith("inside the range without dead values [1e-05, 1e-01]: none")
    assert verdict_text(verdict(runs_of((1e-8, [nan], True))), Rng(1e-8, 1e-8), "accuracy") == (
        "best ε: none (every run diverged)"
    )


def test_a_diverged_run_is_never_the_best():
    """A NaN training loss with a finite accuracy (argmax of NaN logits) is a diverged run."""
    ok = [TrainResult(1e-8, 80.0, 0.5, 1, 0.1, 0.25)]
    bad = [TrainResult(1e-3, 95.0, nan, 1, 0.1, 0.25)]
    runs = [summarize_runs(1e-3, bad, False), summarize_runs(1e-8, ok, True)]
    assert runs[0].diverged == 1 and math.isnan(runs[0].metric)
    v = verdict(runs)
    assert v.best is runs[1] and v.within_noise == [1e-8]
