"""``fasthist staleness``: loss spikes made on purpose, and whether second-moment staleness
warns before them better than the gradient norm does (:mod:`fasthist.tasks.spikes`).

Trains the language-model task once per scenario and seed, replays the alert rule of
:class:`fasthist.health.StalenessAlert` on the median RMS staleness over tensors (exact, and
read off its histogram) and, as the baseline any user has, the same rule on the global
gradient norm; writes ``staleness.json`` and ``staleness.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict
from typing import Any

from ..progress import progress_bar
from .args import UsageError, positive_int, resolve_device
from .output import Outputs, draw_figures, out_folder, prepare_out, report_written, table

__all__ = ["FILES", "RULE", "add_parser", "run"]

FILES = ["staleness.json", "staleness.png"]
#: The alert rule replayed on every signal (StalenessAlert's defaults, said here once).
RULE = {"ratio": 3.0, "window": 50, "patience": 1, "cooldown": 10}


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    from ..tasks.spikes import SCENARIOS

    p = sub.add_parser(
        "staleness",
        parents=parents,
        help="make loss spikes on purpose and check whether staleness warns before them",
        description="Train the language model (default optimizer, decoupled weight decay), change one thing once the loss has settled "
        f"({'; '.join(f'{k}: {v}' for k, v in SCENARIOS.items())}), and compare the staleness alert with "
        "the same rule on the gradient norm: spikes warned of, steps ahead, false alarms.",
    )
    p.add_argument("--seeds", type=positive_int, default=5, help="runs per scenario, seeds seed..seed+N-1 (default: 5)")
    p.add_argument("--steps", type=positive_int, default=500, help="steps per run (default: 500)")
    p.add_argument("--at", type=positive_int, default=250, help="step of the change (default: 250)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated (default: {','.join(SCENARIOS)})")


def _check(args: argparse.Namespace) -> list[str]:
    from ..tasks.spikes import SCENARIOS, SPIKE_WINDOW

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad or not scenarios:
        raise UsageError(f"invalid --scenarios {args.scenarios!r}; choose from {', '.join(SCENARIOS)}")
    if not SPIKE_WINDOW <= args.at < args.steps:
        raise UsageError(f"--at must be in [{SPIKE_WINDOW}, --steps): the loss needs a history before the change")
    return scenarios


def _signals() -> dict[str, Any]:
    return {
        "staleness": lambda trial, t: dict(zip(trial.names, trial.rms[t], strict=True)),
        "staleness (histogram)": lambda trial, t: dict(zip(trial.names, trial.rms_hist[t], strict=True)),
        "gradient norm": lambda trial, t: [trial.grad_norm[t]],
    }


def _verdicts(trials: list[Any]) -> dict[str, dict[str, Any]]:
    from ..tasks.spikes import evaluate

    out: dict[str, dict[str, Any]] = {}
    for scenario in dict.fromkeys(t.scenario for t in trials):
        these = [t for t in trials if t.scenario == scenario]
        for name, signal in _signals().items():
            v = evaluate(these, signal, **RULE)
            out.setdefault(name, {})[scenario] = {**asdict(v), "per_1000": v.false_alarms_per_1000_steps}
    return out


def _healthy_threshold_share(trials: list[Any]) -> float | None:
    """Share of steps of the healthy runs (after the first 50) where some tensor's RMS
    staleness is above 1, StableAdamW's clipping point."""
    steps = [max(r) > 1.0 for t in trials if t.scenario == "none" for r in t.rms[50:]]
    return sum(steps) / len(steps) if steps else None


def run(args: argparse.Namespace) -> int:
    from ..catalog import default, optimizer_class
    from ..tasks import get_task
    from ..tasks.spikes import run_trial

    scenarios = _check(args)
    device = resolve_device(args.device)
    folder = prepare_out(out_folder(args))
    t_start = time.perf_counter()
    seeds = [args.seed + i for i in range(args.seeds)]
    print(f"fasthist staleness: {get_task(args.task, seed=seeds[0], device=device).describe()}")
    label = f"{optimizer_class(default()).__name__} with decoupled weight decay"
    print(f"{label}, {args.steps} steps per run, change at step {args.at}, seeds {seeds[0]}..{seeds[-1]}, {device}")
    bar = progress_bar(len(scenarios) * len(seeds), "runs", enabled=not args.quiet)
    trials = []
    for scenario in scenarios:
        for seed in seeds:
            trials.append(
                run_trial(get_task(args.task, seed=seed, device=device), scenario, steps=args.steps, at=args.at)
            )
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    verdicts = _verdicts(trials)
    _print(verdicts, scenarios, _healthy_threshold_share(trials))
    fields = {
        "task": args.task,
        "steps": args.steps,
        "at": args.at,
        "seeds": seeds,
        "rule": RULE,
        "verdicts": verdicts,
        "healthy_share_rms_above_1": _healthy_threshold_share(trials),
        "trials": [asdict(t) for t in trials],
        "seconds": time.perf_counter() - t_start,
    }
    with Outputs(folder, FILES) as outputs:
        payload = outputs.write_result("staleness.json", "staleness", fields)
        figures = draw_figures(outputs, [("staleness.png", lambda p: _figure(payload, p))], args.no_figures)
    report_written(folder, ["staleness.json", *figures], t_start)
    return 0


def _print(verdicts: dict[str, dict[str, Any]], scenarios: list[str], share: float | None) -> None:
    rows = []
    for name, per in verdicts.items():
        for scenario in scenarios:
            v = per[scenario]
            lead = f"{statistics.median(v['leads']):g}" if v["leads"] else "-"
            rows.append(
                [name, scenario, f"{v['warned']}/{v['spikes']}", lead, str(v["false_alarms"]), f"{v['per_1000']:.2f}"]
            )
    print()
    print(table(["signal", "scenario", "warned", "median lead", "false alarms", "per 1000 steps"], rows, "llrrrr"))
    if share is not None:
        print(f"healthy runs: some tensor's RMS staleness above 1 (StableAdamW's clip) at {100 * share:.0f}% of steps")


def _relative(series: list[float], window: int) -> list[float]:
    """Each value over the median of the ``window`` before it (NaN for the first ``window``)."""
    return [
        series[t] / statistics.median(series[t - window : t]) if t >= window else float("nan")
        for t in range(len(series))
    ]


def _figure(payload: dict[str, Any], path: str) -> None:
    """Per scenario (columns), around the change: the loss, the median RMS staleness over
    tensors and the gradient norm, each over its median of the previous 50 steps (one line
    per seed); the dashed line is the alert's ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials, at = payload["trials"], payload["at"]
    scenarios = list(dict.fromkeys(t["scenario"] for t in trials))
    rows = [
        ("loss / its median", lambda t: t["loss"]),
        ("median RMS staleness / its median", lambda t: [statistics.median(r) for r in t["rms"]]),
        ("gradient norm / its median", lambda t: t["grad_norm"]),
    ]
    fig, axes = plt.subplots(len(rows), len(scenarios), figsize=(3.2 * len(scenarios), 7), sharex=True, squeeze=False)
    lo, hi = max(0, at - 40), min(payload["steps"], at + 60)
    for j, scenario in enumerate(scenarios):
        axes[0][j].set_title(scenario)
        for i, (label, series) in enumerate(rows):
            ax = axes[i][j]
            for trial in (t for t in trials if t["scenario"] == scenario):
                rel = _relative(series(trial), RULE["window"])
                ax.plot(range(lo - at, hi - at), rel[lo:hi], lw=0.8)
            ax.axhline(RULE["ratio"] if i else 1.2, ls="--", c="k", lw=0.6)
            ax.set_yscale("log")
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
        axes[-1][j].set_xlabel("steps from the change")
    fig.suptitle(f"{payload['task']}: loss, staleness and gradient norm around the change (seeds {payload['seeds']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
