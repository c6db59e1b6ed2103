"""``fasthist eps-range``: the paper's ε-range rule on an embedded task, at the model's
initial weights (nothing is trained): a per-tensor table, the range and its candidate
decades; writes ``eps_range.json``, ``histograms.png`` and ``adaptability.png``."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from ..eps import EpsRange
from .args import nonneg_float, positive_float, positive_int, resolve_device
from .output import Outputs, decades, draw_figures, out_folder, prepare_out, report_written, sci, table

__all__ = ["ADAPTIVE_SHARE_EPS", "FILES", "add_parser", "run", "tensor_rows"]

#: Every file the command writes (a run replaces all of them, see :class:`.output.Outputs`).
FILES = ("eps_range.json", "histograms.png", "adaptability.png")

#: The ε of the table's "share above ε" column (Adam's default).
ADAPTIVE_SHARE_EPS = 1e-8


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    from ..estimate import eps_optimizers

    p = sub.add_parser(
        "eps-range",
        parents=parents,
        help="estimate ε's search range on a task (trains nothing)",
        description="Run the paper's ε-range rule: one epoch of gradients at the initial weights, "
        "per-tensor 2%/98% points of sqrt(v_hat) (zeros dropped), envelope, decade rounding.",
    )
    p.add_argument("--optimizer", default="adam", choices=eps_optimizers(), help="default: adam")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="as in training (default: 0)")
    p.add_argument("--clip-grad-norm", type=positive_float, default=None, help="as in training (default: none)")
    p.add_argument("--steps", type=positive_int, default=None, help="at most this many batches (default: one epoch)")


def tensor_rows(opt: Any, rng: EpsRange, eps: float) -> list[dict]:
    """Per tensor: size, zeros, the 2/50/98% points of the histogrammed quantity (zeros
    dropped) and the share of its elements above ``eps``."""
    from ..histogram import batched_fraction_above, batched_quantile

    _, _, counts = opt.histogram_rows("step")
    bins = opt.bins
    p50 = batched_quantile(counts, torch.tensor([0.5], dtype=torch.float64), bins, exclude_zeros=True, rule="n")
    share = batched_fraction_above(counts, eps, bins)
    p50, share = p50[:, 0].cpu().tolist(), share.cpu().tolist()
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
        }
        for r, m, s in zip(rng.rows, p50, share, strict=True)
    ]


def run(args: argparse.Namespace) -> int:
    from ..estimate import eps_pass, grid_inside
    from ..tasks import get_task

    device = resolve_device(args.device)
    folder = prepare_out(out_folder(args))
    t0 = time.perf_counter()
    task = get_task(args.task, seed=args.seed, device=device)
    model = task.model()
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
    rng = opt.eps_range()
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
    outputs = Outputs(folder, FILES)
    try:
        outputs.write_result("eps_range.json", "eps-range", fields)
        figures = draw_figures(outputs, _figures(opt, rng, args.task), args.no_figures)
        outputs.commit()
    finally:
        outputs.discard()
    report_written(folder, ["eps_range.json", *figures], t0)
    return 0


def _print_summary(rows: list[dict], rng: EpsRange, grid: list[float], inside: list[float]) -> None:
    eps = ADAPTIVE_SHARE_EPS
    cells = [
        [
            r["name"],
            f"{r['numel']:,}",
            sci(r["p02"]),
            sci(r["p50"]),
            sci(r["p98"]),
            f"{100 * r['zero_share']:.1f}%",
            f"{100 * r['adaptive_share']:.1f}%",
        ]
        for r in rows
    ]
    print(table(["tensor", "size", "p2", "p50", "p98", "zero", f"> {eps:.0e}"], cells, "lrrrrrr"))
    print()
    print(f"estimated ε range: [{rng.low:.0e}, {rng.high:.0e}]   (raw {rng.low_raw:.3g} .. {rng.high_raw:.3g})")
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
