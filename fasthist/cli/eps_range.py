"""``fasthist eps-range``: the paper's ε-range rule on an embedded task, at the model's
initial weights (nothing is trained): a per-tensor table, the range and its candidate
decades; writes ``eps_range.json``, ``histograms.png`` and ``adaptability.png``."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from ..eps import DEAD_RATIO, EpsBounds, EpsRange, eps_range_from_counts, excluded_names
from .args import UsageError, nonneg_float, positive_float, positive_int, resolve_device
from .output import (
    Outputs,
    check_out,
    decades,
    draw_figures,
    load_cpu_kernel,
    out_folder,
    prepare_out,
    report_written,
    sci,
    table,
)

__all__ = ["ADAPTIVE_SHARE_EPS", "FILES", "add_parser", "range_lines", "run", "tensor_rows"]

#: Every file the command writes (a run replaces all of them, see :class:`.output.Outputs`).
FILES = ("eps_range.json", "histograms.png", "adaptability.png")

#: The ε of the table's "share above ε" column (the conventional default ε).
ADAPTIVE_SHARE_EPS = 1e-8


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    from ..estimate import DEFAULT_OPTIMIZER, eps_optimizers

    p = sub.add_parser(
        "eps-range",
        parents=parents,
        help="estimate ε's search range on a task (trains nothing)",
        description="Run the paper's ε-range rule: one epoch of gradients at the initial weights, "
        "per-tensor 2%/98% points of sqrt(v_hat) (zeros dropped), envelope, decade rounding.",
    )
    p.add_argument(
        "--optimizer", default=DEFAULT_OPTIMIZER, choices=eps_optimizers(), help=f"default: {DEFAULT_OPTIMIZER}"
    )
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="as in training (default: 0)")
    p.add_argument("--clip-grad-norm", type=positive_float, default=None, help="as in training (default: none)")
    p.add_argument("--steps", type=positive_int, default=None, help="at most this many batches (default: one epoch)")
    p.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="PATTERN",
        help="leave out the tensors whose name matches this glob pattern (repeatable)",
    )
    p.add_argument(
        "--drop-dead",
        action="store_true",
        help="leave out numerically dead values (float32 rounding noise, more than 2^16 below the model's bulk); "
        "by default they are flagged and counted, as in the paper",
    )


def tensor_rows(opt: Any, rng: EpsRange, eps: float) -> list[dict]:
    """Per tensor: size, zeros, the 2/50/98% points of the histogrammed quantity (zeros
    dropped) and the share of its elements above ``eps``: the median and the share are
    those every integration logs (:func:`fasthist.integrations.metrics.snapshot`)."""
    from ..integrations.metrics import QUANTILES, snapshot

    snap = snapshot(opt, "step", eps=eps)
    p50 = snap.quantiles[:, QUANTILES.index(0.5)].tolist()
    share = snap.adaptive.tolist()
    return [
        {
            "name": r.name,
            "numel": r.numel,
            "nonzero": r.nonzero,
            "zero_share": 1.0 - r.nonzero / r.numel if r.numel else math.nan,
            "p02": r.low,
            "p50": m,
            "p98": r.high,
            "adaptive_share": s,
            "dead": r.dead,  # numerically dead values (below the range's dead_floor)
            "dead_share": r.dead_share,
            "excluded": r.excluded,
        }
        for r, m, s in zip(rng.rows, p50, share, strict=True)
    ]


def run(args: argparse.Namespace) -> int:
    from ..estimate import eps_pass, grid_inside
    from ..tasks import get_task

    device = resolve_device(args.device)
    folder = check_out(out_folder(args))
    t0 = time.perf_counter()
    task = get_task(args.task, seed=args.seed, device=device)
    model = task.model()
    _check_exclude(model, args.exclude)  # needs the model's names; before anything is written
    prepare_out(folder)
    load_cpu_kernel(device)
    batches = task.batches(0)
    n = len(batches) if args.steps is None else min(args.steps, len(batches))
    opt = eps_pass(
        model,
        batches,
        task.loss,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        clip_grad_norm=args.clip_grad_norm,
        steps=args.steps,
        progress=not args.quiet,
    )
    names, _, counts = opt.histogram_rows("step")
    rng = eps_range_from_counts(names, counts, opt.bins, exclude=args.exclude, drop_dead=args.drop_dead)
    seconds = time.perf_counter() - t0
    rows = tensor_rows(opt, rng, ADAPTIVE_SHARE_EPS)
    grid = list(task.eps_grid)
    inside = grid_inside(grid, rng)

    print(f"fasthist eps-range: {task.describe()}")
    print(f"optimizer {args.optimizer}, seed {args.seed}, {n} batches at the initial weights, {device}")
    print()
    _print_summary(rows, rng, grid, inside)
    print(f"ε range computed in {seconds:.2f} s (task, pass and rule; `seconds` in eps_range.json)")
    fields = {
        "task": args.task,
        "description": task.describe(),
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "clip_grad_norm": args.clip_grad_norm,
        "exclude": args.exclude or [],
        "drop_dead": args.drop_dead,
        "seed": args.seed,
        "device": device,
        "batches": n,
        "seconds": seconds,  # loading the task, the pass and the rule; not the figures
        "adaptive_share_eps": ADAPTIVE_SHARE_EPS,
        "conventional_grid": grid,
        "grid_inside": inside,
        "eps_range": rng.to_dict(),
        "tensors": rows,
    }
    with Outputs(folder, FILES) as outputs:
        outputs.write_result("eps_range.json", "eps-range", fields)
        figures = draw_figures(outputs, _figures(opt, rng, args.task), args.no_figures)
    report_written(folder, ["eps_range.json", *figures], t0)
    return 0


def _check_exclude(model: torch.nn.Module, patterns: list[str] | None) -> None:
    """``--exclude`` against the model's trainable tensors, before the pass: a pattern that
    matches none is a usage error."""
    try:
        excluded_names([n for n, p in model.named_parameters() if p.requires_grad], patterns)
    except ValueError as e:
        raise UsageError(f"--exclude: {e}") from None


def _print_summary(rows: list[dict], rng: EpsRange, grid: list[float], inside: list[float]) -> None:
    eps = ADAPTIVE_SHARE_EPS
    cells = [
        [
            r["name"] + (" (excluded)" if r["excluded"] else ""),
            f"{r['numel']:,}",
            sci(r["p02"]),
            sci(r["p50"]),
            sci(r["p98"]),
            f"{100 * r['zero_share']:.1f}%",
            f"{100 * r['dead_share']:.0f}%" if r["dead"] else "",
            f"{100 * r['adaptive_share']:.1f}%",
        ]
        for r in rows
    ]
    print(table(["tensor", "size", "p2", "p50", "p98", "zero", "dead", f"> {eps:.0e}"], cells, "lrrrrrrr"))
    print()
    for line in range_lines(rng):
        print(line)
    print(f"candidate decades: {decades(rng.candidates)}")
    print(
        f"the conventional grid {grid[0]:.0e} .. {grid[-1]:.0e} has {len(grid)} points; "
        f"{len(inside)} lie in the range ({len(grid) - len(inside)} saved)"
    )
    if rng.ambiguous:
        print(
            f"note: a raw bound lies within the histogram's {100 * rng.relative_accuracy:.2f}% accuracy of a "
            "rounding boundary; a sort-based computation could round it to the neighbouring decade"
        )


def _bounds_line(label: str, b: EpsBounds | EpsRange) -> str:
    return (
        f"{label}: [{b.low:.0e}, {b.high:.0e}]   low {b.low_raw:.3g} from {b.low_tensor} "
        f"({b.low_decades:.1f} decades below the median p2), high {b.high_raw:.3g} from {b.high_tensor} "
        f"({b.high_decades:.1f} decades above the median p98)"
    )


def range_lines(rng: EpsRange) -> list[str]:
    """The range, which tensor sets each bound, the dead tensors and, when it differs, the
    other range (the paper's, or the one without dead values)."""
    chosen = "estimated ε range"
    if rng.excluded or rng.drop_dead:
        left = [*(["numerically dead values"] if rng.drop_dead else []), *rng.excluded]
        chosen += f" without {', '.join(left)}"
    lines = [_bounds_line(chosen, rng)]
    if rng.dead:
        lines.append(
            f"numerically dead (√v̂ below {rng.dead_floor:.2g}, 2^{math.log2(DEAD_RATIO):.0f} x the median p98): "
            + ", ".join(f"{r.name} ({100 * r.dead_share:.0f}%)" for r in rng.rows if r.dead)
        )
    paper, live = rng.paper, rng.without_dead
    if paper is not None and (paper.low, paper.high) != (rng.low, rng.high):
        lines.append(_bounds_line("the paper's rule over every tensor", paper))
    if live is not None and not rng.drop_dead and (live.low, live.high) != (rng.low, rng.high):
        lines.append(_bounds_line("without the numerically dead values (--drop-dead)", live))
    return lines


def _figures(opt: Any, rng: EpsRange, task_name: str) -> list[tuple[str, Any]]:
    eps = ADAPTIVE_SHARE_EPS

    def histograms(path: str) -> None:
        from .. import plot

        plot.histograms(opt, eps=eps, eps_range=rng, title=f"√v̂ at the initial weights, {task_name}", path=path)

    def adaptability(path: str) -> None:
        from .. import plot

        title = f"Adaptability at the initial weights, {task_name}"
        plot.adaptability(opt, eps=eps, eps_range=rng, title=title, path=path)

    return [("histograms.png", histograms), ("adaptability.png", adaptability)]
