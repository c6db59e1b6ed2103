"""``fasthist sweep``: trains the task with the default optimizer
(:func:`fasthist.catalog.default`) once per ε of the conventional grid (and per seed), reports the validation metric per ε, the best ε, whether the range holds it and
how many grid points the range saves; writes ``sweep.json``, ``sweep.png`` and
``quantiles.png``."""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..eps import EpsRange
from ..progress import progress_bar
from .args import eps_list, positive_float, positive_int, resolve_device
from .output import Outputs, decades, draw_figures, load_cpu_kernel, out_folder, prepare_out, report_written, table

__all__ = ["FILES", "EpsRuns", "SweepVerdict", "add_parser", "run", "summarize_runs", "sweep_verdict", "verdict_text"]

#: Every file the command writes (a run replaces all of them, see :class:`.output.Outputs`).
FILES = ("sweep.json", "sweep.png", "quantiles.png")


@dataclass(frozen=True, eq=False)
class EpsRuns:
    """The runs of one ε, one per seed (a row of ``sweep.json``'s ``runs``)."""

    eps: float
    metric: float  # the mean over seeds; NaN when any seed diverged
    metric_min: float  # over the seeds that did not diverge (NaN if none)
    metric_max: float
    metrics: list[float]
    adaptive_share: float  # mean share of sqrt(v_hat) above eps at the last step
    final_loss: float
    seconds: float
    in_range: bool
    diverged: int = 0  # seeds whose metric or final training loss is NaN or infinite


@dataclass(frozen=True, eq=False)
class SweepVerdict:
    """What the sweep says about the estimated range.

    ``best`` is None when every ε diverged; ``tied`` are the runs whose mean equals the
    best's (the best among them), ``tied_inside`` those of them inside the range;
    ``within_noise`` the ε whose best seed reaches the best run's worst seed; ``saved`` the
    grid points outside the range; ``narrowing`` grid points per candidate decade.
    """

    best: EpsRuns | None
    tied: list[EpsRuns]
    tied_inside: list[EpsRuns]
    within_noise: list[float]
    saved: int
    narrowing: float

    def best_fields(self) -> dict[str, Any]:
        """The verdict's keys of ``sweep.json``."""
        b = self.best
        return {
            "best_eps": b.eps if b is not None else None,
            "best_metric": b.metric if b is not None else None,
            "best_inside": bool(b.in_range) if b is not None else None,
            "best_tied": [r.eps for r in self.tied],
            "within_noise_of_best": self.within_noise,
        }


def summarize_runs(eps: float, results: Sequence[Any], in_range: bool) -> EpsRuns:
    """One ε's :class:`EpsRuns` from its seeds' :class:`~fasthist.tasks.TrainResult`. A seed
    diverged when its metric or its final training loss is not finite (a NaN loss can leave
    an accuracy that looks fine); its metric counts as NaN, so the ε's mean is NaN and the ε
    can never be the best."""
    metrics = [r.metric if math.isfinite(r.metric) and math.isfinite(r.final_loss) else math.nan for r in results]
    finite = [m for m in metrics if math.isfinite(m)]
    return EpsRuns(
        eps=eps,
        metric=statistics.fmean(finite) if len(finite) == len(metrics) else math.nan,
        metric_min=min(finite) if finite else math.nan,
        metric_max=max(finite) if finite else math.nan,
        metrics=metrics,
        adaptive_share=statistics.fmean(r.adaptive_share for r in results),
        final_loss=statistics.fmean(r.final_loss for r in results),
        seconds=sum(r.seconds for r in results),
        in_range=in_range,
        diverged=len(metrics) - len(finite),
    )


def sweep_verdict(
    runs: Sequence[EpsRuns],
    grid: Sequence[float],
    inside: Sequence[float],
    candidates: int,
    *,
    better: Callable[[float, float], bool],
    higher_is_better: bool,
) -> SweepVerdict:
    """The best ε of ``runs`` (by ``better(a, b)``, the task's), its ties and the ε within
    noise of it, and what the range (``inside`` of ``grid``, ``candidates`` decades) saves."""
    finite = [r for r in runs if math.isfinite(r.metric)]  # an ε with a diverged seed is never the best
    best = finite[0] if finite else runs[0]
    for r in finite[1:]:
        if better(r.metric, best.metric):
            best = r
    best_ok = math.isfinite(best.metric)
    # Equal means are a tie, common with a small validation set; the range "holds the best"
    # when searching only inside it reaches the best value, i.e. when any tied ε is inside.
    tied = [r for r in runs if best_ok and r.metric == best.metric]
    tied_inside = [r for r in tied if r.in_range]
    if tied_inside:
        best = tied_inside[0]
    within = [r.eps for r in runs if math.isfinite(r.metric) and _overlaps(r, best, higher_is_better)]
    return SweepVerdict(
        best=best if best_ok else None,
        tied=tied,
        tied_inside=tied_inside,
        within_noise=within,
        saved=len(grid) - len(inside),
        narrowing=len(grid) / candidates,
    )


def verdict_text(verdict: SweepVerdict, rng: EpsRange, metric: str, unit: str = "") -> str:
    """The sweep's verdict in one line, the same on the console and as ``sweep.png``'s title:
    every tied best ε, and which of them lie inside the range (and inside the range without
    numerically dead values, when that differs)."""
    best = verdict.best
    if best is None:
        return "best ε: none (every run diverged)"
    bounds = f"[{rng.low:.0e}, {rng.high:.0e}]"
    live = rng.without_dead
    tied = [r.eps for r in verdict.tied]

    def inside(b: Any, values: list[float]) -> list[float]:
        return [e for e in values if b.low * (1 - 1e-9) <= e <= b.high * (1 + 1e-9)]

    if len(tied) == 1:
        where = "inside" if best.in_range else "OUTSIDE"
        text = f"best ε: {best.eps:.0e} ({metric} {best.metric:.2f}{unit}), {where} the estimated range {bounds}"
    else:
        text = (
            f"best ε: a tie between {decades(tied)} ({metric} {best.metric:.2f}{unit}); inside the estimated range "
            f"{bounds}: {decades([r.eps for r in verdict.tied_inside]) or 'none'}"
        )
    if live is not None and (live.low, live.high) != (rng.low, rng.high):
        text += f"; inside the range without dead values [{live.low:.0e}, {live.high:.0e}]: {decades(inside(live, tied)) or 'none'}"
    return text


def _overlaps(r: EpsRuns, best: EpsRuns, higher: bool) -> bool:
    """Whether run ``r``'s best seed reaches the best run's worst seed."""
    if higher:
        return r.metric_max >= best.metric_min
    return r.metric_min <= best.metric_max


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sweep",
        parents=parents,
        help="train once per ε of a grid and check the estimated range",
        description="Train the task with the default optimizer once per ε (and per seed), report the validation metric per ε, "
        "the best ε and whether the estimated range contains it.",
    )
    p.add_argument("--eps", type=eps_list, default=None, help="comma-separated ε grid (default: the task's)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per run (default: the task's)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--seeds", type=positive_int, default=3, help="runs per ε, seeds seed..seed+N-1 (default: 3)")
    p.add_argument("--steps", type=positive_int, default=None, help="at most this many steps per run")


def run(args: argparse.Namespace) -> int:
    from ..catalog import default, optimizer_class
    from ..estimate import grid_inside
    from ..tasks import get_task

    device = resolve_device(args.device)
    folder = prepare_out(out_folder(args))
    load_cpu_kernel(device)
    t_start = time.perf_counter()
    tasks = [get_task(args.task, seed=args.seed + i, device=device) for i in range(args.seeds)]
    task = tasks[0]
    grid, epochs, lr, per_run = _settings(args, task)

    print(f"fasthist sweep: {task.describe()}")
    print(
        f"{optimizer_class(default()).__name__} lr {lr:g}, {epochs} epoch(s) ({per_run} steps) per run, seeds {args.seed}..{args.seed + args.seeds - 1}, "
        f"ε grid {decades(grid)}, {device}"
    )
    rng = _initial_range(task, args)
    inside = grid_inside(grid, rng)
    print(f"estimated ε range at the initial weights (seed {args.seed}): [{rng.low:.0e}, {rng.high:.0e}]")

    runs, traces = _train_grid(tasks, grid, inside, lr, epochs, args.steps, per_run, args.quiet)
    verdict = sweep_verdict(
        runs, grid, inside, len(rng.candidates), better=task.better, higher_is_better=task.higher_is_better
    )
    seconds = time.perf_counter() - t_start
    _print_results(runs, verdict, task, len(tasks), rng, grid, inside)
    print(f"sweep computed in {seconds:.1f} s (range and training; `seconds` in sweep.json)")

    fields = {
        "task": args.task,
        "description": task.describe(),
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "lr": lr,
        "epochs": epochs,
        "steps_per_run": per_run,
        "seeds": [t.seed for t in tasks],
        "device": device,
        "grid": grid,
        "eps_range": rng.to_dict(),
        "grid_inside": inside,
        "saved": verdict.saved,
        "narrowing": verdict.narrowing,  # len(grid) / number of candidate decades
        "runs": [asdict(r) for r in runs],
        **verdict.best_fields(),
        "verdict": verdict_text(verdict, rng, task.metric, "%" if task.metric == "accuracy" else ""),
        "seconds": seconds,  # the range and the training runs; not the figures
    }
    with Outputs(folder, FILES) as outputs:
        payload = outputs.write_result("sweep.json", "sweep", fields)
        figures = draw_figures(outputs, _figures(payload, traces, verdict, grid, args.task), args.no_figures)
    report_written(folder, ["sweep.json", *figures], t_start)
    return 0


def _initial_range(task: Any, args: argparse.Namespace) -> EpsRange:
    """The range the sweep checks: the rule at the first seed's initial weights, over one
    epoch of its data (at most ``--steps`` batches), clipped as the task trains."""
    from ..estimate import estimate_eps_range

    return estimate_eps_range(
        task.model(),
        task.batches(0),
        task.loss,
        steps=args.steps,
        clip_grad_norm=task.clip_grad_norm,
        progress=not args.quiet,
    )


def _settings(args: argparse.Namespace, task: Any) -> tuple[list[float], int, float, int]:
    """The ε grid, epochs and learning rate (the arguments', else the task's) and the steps per run."""
    grid = args.eps if args.eps is not None else list(task.eps_grid)
    epochs = args.epochs if args.epochs is not None else task.epochs
    lr = args.lr if args.lr is not None else task.lr
    per_epoch = len(task.batches(0))
    per_run = per_epoch * epochs if args.steps is None else min(args.steps, per_epoch * epochs)
    return grid, epochs, lr, per_run


def _train_grid(
    tasks: list[Any],
    grid: list[float],
    inside: list[float],
    lr: float,
    epochs: int,
    steps: int | None,
    per_run: int,
    quiet: bool,
) -> tuple[list[EpsRuns], dict[float, Any]]:
    """Trains every task (seed) once per ε (``per_run`` steps each); returns the runs per
    ε and, per ε, the quantile trace of the first seed's run."""
    from ..tasks import train

    bar = progress_bar(len(grid) * len(tasks) * per_run, "sweep", enabled=not quiet)
    runs = []
    traces = {}
    try:
        for eps in grid:
            results = []
            for i, t in enumerate(tasks):
                if bar is not None:
                    bar.set_postfix_str(f"ε={eps:.0e} seed={t.seed}")
                res = train(
                    t,
                    eps=eps,
                    lr=lr,
                    epochs=epochs,
                    steps=steps,
                    record_every=max(1, per_run // 200) if i == 0 else 0,
                    progress=bar.update if bar is not None else None,
                )
                results.append(res)
                if res.trace is not None:
                    traces[eps] = res.trace
            runs.append(summarize_runs(eps, results, eps in inside))
    finally:
        if bar is not None:
            bar.close()
    return runs, traces


def _print_results(
    runs: list[EpsRuns],
    verdict: SweepVerdict,
    task: Any,
    seeds: int,
    rng: EpsRange,
    grid: list[float],
    inside: list[float],
) -> None:
    unit = "%" if task.metric == "accuracy" else ""
    tie = "<- best" if len(verdict.tied) == 1 else "<- best (tie)"
    cells = [
        [
            f"{r.eps:.0e}",
            f"{r.metric:.2f}{unit}" if math.isfinite(r.metric) else f"diverged ({r.diverged}/{len(r.metrics)})",
            f"{r.metric_min:.2f} .. {r.metric_max:.2f}" if math.isfinite(r.metric_min) else "-",
            f"{100 * r.adaptive_share:.1f}%" if math.isfinite(r.adaptive_share) else "-",
            "yes" if r.in_range else "no",
            tie if any(r is t for t in verdict.tied) else "",
        ]
        for r in runs
    ]
    headers = ["eps", f"{task.metric} (mean)", f"min .. max over {seeds}", "share > eps", "in range", ""]
    print()
    print(table(headers, cells, "lrrrll"))
    print()
    best = verdict.best
    print(verdict_text(verdict, rng, task.metric, unit))
    if best is not None:
        print(f"ε values whose seed range overlaps the best's: {decades(verdict.within_noise)}")
    print(
        f"grid: {len(grid)} points, of which {len(inside)} lie in the range ({verdict.saved} saved); the range spans "
        f"{len(rng.candidates)} decades: {verdict.narrowing:.2f}x narrower than the grid (the paper claims at least 2x)"
    )


def _figures(
    payload: dict, traces: dict[float, Any], verdict: SweepVerdict, grid: list[float], task_name: str
) -> list[tuple[str, Any]]:
    """sweep.png, and quantiles.png of the best ε's first seed (else the grid's first ε)."""
    best = verdict.best
    shown = best.eps if best is not None and best.eps in traces else grid[0]

    def sweep_png(path: str) -> None:
        from .. import plot

        plot.sweep(payload, path=path)

    def quantiles_png(path: str) -> None:
        from .. import plot

        title = f"√v̂ quantiles while training {task_name}, ε={shown:.0e}"
        plot.quantiles(traces[shown], eps=shown, title=title, path=path)

    return [("sweep.png", sweep_png), *([("quantiles.png", quantiles_png)] if traces else [])]
