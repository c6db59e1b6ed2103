"""The ``fasthist`` command (also ``python -m fasthist``).

- ``fasthist eps-range``: the paper's ε-range rule on an embedded task, at the model's
  initial weights (nothing is trained): a per-tensor table, the range and its candidate
  decades; writes ``eps_range.json``, ``histograms.png`` and ``adaptability.png``.
- ``fasthist sweep``: trains the task with Adam once per ε of the conventional grid (and
  per seed), reports the validation metric per ε, the best ε, whether the range holds
  it and how many grid points the range saves; writes ``sweep.json``, ``sweep.png`` and
  ``quantiles.png``.
- ``fasthist bench``: time of one optimizer step against ``torch.optim.Adam``, as ratios.

Bad arguments end with a one-line error and exit status 2; failures while running end
with a one-line error and status 1 (``FASTHIST_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import __version__

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _UsageError(Exception):
    """A bad argument found after parsing (exit status 2)."""


def _eps_list(text: str) -> list[float]:
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


def _number(cast: type, low: float, inclusive: bool, what: str):
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


_positive_int = _number(int, 0, False, "positive integer")
_nonneg_int = _number(int, 0, True, "non-negative integer")
_positive_float = _number(float, 0.0, False, "positive number")


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"invalid non-negative number {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .estimate import eps_optimizers
    from .tasks import TASKS

    common = _Parser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads for torch (default: 1; more threads than free cores make every small op wait "
        "for a descheduled thread)",
    )
    task = _Parser(add_help=False)
    task.add_argument("--task", default="digits", choices=TASKS, help="embedded task (default: digits)")
    task.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default: 0)")
    task.add_argument("--out", default="fasthist-out", help="output folder (default: ./fasthist-out)")
    task.add_argument("--no-figures", action="store_true", help="write the JSON only, no PNG figures")

    parser = _Parser(prog="fasthist", description="Adam's ε from histograms of sqrt(v_hat) (Silva & Rodriguez, 2024).")
    parser.add_argument("--version", action="version", version=f"fasthist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{eps-range,sweep,bench}")
    sub.required = True

    p = sub.add_parser(
        "eps-range",
        parents=[task, common],
        help="estimate ε's search range on a task (trains nothing)",
        description="Run the paper's ε-range rule: one epoch of gradients at the initial weights, "
        "per-tensor 2%%/98%% points of sqrt(v_hat) (zeros dropped), envelope, decade rounding.",
    )
    p.add_argument("--optimizer", default="adam", choices=eps_optimizers(), help="default: adam")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="as in training (default: 0)")
    p.add_argument("--clip-grad-norm", type=_positive_float, default=None, help="as in training (default: none)")
    p.add_argument("--steps", type=_positive_int, default=None, help="at most this many batches (default: one epoch)")

    p = sub.add_parser(
        "sweep",
        parents=[task, common],
        help="train once per ε of a grid and check the estimated range",
        description="Train the task with Adam once per ε (and per seed), report the validation metric per ε, "
        "the best ε and whether the estimated range contains it.",
    )
    p.add_argument("--eps", type=_eps_list, default=None, help="comma-separated ε grid (default: the task's)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="epochs per run (default: the task's)")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="runs per ε, seeds seed..seed+N-1 (default: 3)")
    p.add_argument("--steps", type=_positive_int, default=None, help="at most this many steps per run")

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="overhead of tracking against torch.optim.Adam",
        description="Time one optimizer step of fasthist.Adam against torch.optim.Adam on this machine.",
    )
    p.add_argument("--params", type=_positive_int, default=4_000_000, help="total parameters (default: 4,000,000)")
    p.add_argument("--steps", type=_positive_int, default=20, help="timed steps per round (default: 20)")
    return parser


# -- helpers -----------------------------------------------------------------------------
def _device(name: str) -> str:
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise _UsageError(f"--device {name}: no CUDA GPU is available (torch.cuda.is_available() is False)")
        return name
    raise _UsageError(f"--device {name!r}: expected cpu or cuda")


def _bar(total: int | None, quiet: bool, desc: str) -> Any:
    if quiet:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def _clean(x: Any) -> Any:
    """JSON-safe: NaN and infinities become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _fmt(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2e}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _decades(values: Sequence[float]) -> str:
    return " ".join(f"{v:.0e}" for v in values)


def _plots(out: Path, draw: list[tuple[str, Any]], skip: bool = False) -> list[str]:
    """Run the figure functions; without matplotlib, say so once and skip them."""
    if skip:
        return []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fasthist: matplotlib is not installed; figures skipped (pip install -e '.[demo]')", file=sys.stderr)
        return []
    written = []
    for name, fn in draw:
        fn(str(out / name))
        written.append(name)
    return written


# -- eps-range ---------------------------------------------------------------------------
def _eps_rows(opt: Any, rng: Any, eps: float) -> list[dict]:
    from .histogram import batched_fraction_above, batched_quantile

    names, _, counts = opt.histogram_rows("step")
    bins = opt.bins
    p50 = batched_quantile(counts, torch.tensor([0.5], dtype=torch.float64), bins, exclude_zeros=True, rule="n")
    share = batched_fraction_above(counts, eps, bins)
    p50, share = p50[:, 0].cpu().tolist(), share.cpu().tolist()
    rows = []
    for r, m, s in zip(rng.rows, p50, share, strict=True):
        rows.append(
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
        )
    return rows


def cmd_eps_range(args: argparse.Namespace) -> int:
    from .estimate import eps_pass, grid_inside
    from .tasks import get_task

    device = _device(args.device)
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
    eps = 1e-8
    rows = _eps_rows(opt, rng, eps)
    grid = list(task.eps_grid)
    inside = grid_inside(grid, rng)

    print(f"fasthist eps-range: {task.describe()}")
    print(f"optimizer {args.optimizer}, seed {args.seed}, {n} batches at the initial weights, {device}")
    print()
    table = [
        [
            r["name"],
            f"{r['numel']:,}",
            _fmt(r["p02"]),
            _fmt(r["p50"]),
            _fmt(r["p98"]),
            f"{100 * r['zero_share']:.1f}%",
            f"{100 * r['adaptive_share']:.1f}%",
        ]
        for r in rows
    ]
    print(_table(["tensor", "size", "p2", "p50", "p98", "zero", f"> {eps:.0e}"], table, "lrrrrrr"))
    print()
    print(f"estimated ε range: [{rng.low:.0e}, {rng.high:.0e}]   (raw {rng.low_raw:.3g} .. {rng.high_raw:.3g})")
    print(f"candidate decades: {_decades(rng.candidates)}")
    print(
        f"the conventional grid {grid[0]:.0e} .. {grid[-1]:.0e} has {len(grid)} points; "
        f"{len(inside)} lie in the range ({len(grid) - len(inside)} saved)"
    )
    if rng.ambiguous:
        print(
            f"note: a raw bound lies within the histogram's {100 * rng.relative_accuracy:.2f}% accuracy of a "
            "rounding boundary; a sort-based computation could round it to the neighbouring decade"
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "fasthist_version": __version__,
        "command": "eps-range",
        "task": args.task,
        "description": task.describe(),
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "clip_grad_norm": args.clip_grad_norm,
        "seed": args.seed,
        "device": device,
        "batches": n,
        "seconds": seconds,
        "adaptive_share_eps": eps,
        "conventional_grid": grid,
        "grid_inside": inside,
        "eps_range": rng.to_dict(),
        "tensors": rows,
    }
    _write_json(out / "eps_range.json", data)
    from_opt = opt

    def hist_png(path: str) -> None:
        from . import plot

        plot.histograms(from_opt, eps=eps, eps_range=rng, title=f"√v̂ at the initial weights, {args.task}", path=path)

    def adapt_png(path: str) -> None:
        from . import plot

        plot.adaptability(
            from_opt, eps=eps, eps_range=rng, title=f"Adaptability at the initial weights, {args.task}", path=path
        )

    figures = _plots(out, [("histograms.png", hist_png), ("adaptability.png", adapt_png)], args.no_figures)
    total = time.perf_counter() - t0
    print(f"wrote {', '.join(str(out / f) for f in ['eps_range.json', *figures])}  ({total:.1f} s)")
    return 0


# -- sweep -------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from .estimate import estimate_eps_range, grid_inside
    from .tasks import get_task, train

    device = _device(args.device)
    t_start = time.perf_counter()
    tasks = [get_task(args.task, seed=args.seed + i, device=device) for i in range(args.seeds)]
    task = tasks[0]
    grid = args.eps if args.eps is not None else list(task.eps_grid)
    epochs = args.epochs if args.epochs is not None else task.epochs
    lr = args.lr if args.lr is not None else task.lr
    per_epoch = len(task.batches(0))
    per_run = per_epoch * epochs if args.steps is None else min(args.steps, per_epoch * epochs)

    print(f"fasthist sweep: {task.describe()}")
    print(
        f"Adam lr {lr:g}, {epochs} epoch(s) ({per_run} steps) per run, seeds {args.seed}..{args.seed + args.seeds - 1}, "
        f"ε grid {_decades(grid)}, {device}"
    )
    rng = estimate_eps_range(
        task.model(),
        task.batches(0),
        task.loss,
        steps=args.steps,
        clip_grad_norm=task.clip_grad_norm,
        progress=not args.quiet,
    )
    inside = grid_inside(grid, rng)
    print(f"estimated ε range at the initial weights (seed {args.seed}): [{rng.low:.0e}, {rng.high:.0e}]")

    bar = _bar(len(grid) * len(tasks) * per_run, args.quiet, "sweep")
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
                    steps=args.steps,
                    record_every=max(1, per_run // 200) if i == 0 else 0,
                    progress=bar.update if bar is not None else None,
                )
                results.append(res)
                if res.trace is not None:
                    traces[eps] = res.trace
            metrics = [r.metric for r in results]
            finite = [m for m in metrics if math.isfinite(m)]
            runs.append(
                {
                    "eps": eps,
                    "metric": statistics.fmean(finite) if len(finite) == len(metrics) else math.nan,
                    "metric_min": min(finite) if finite else math.nan,
                    "metric_max": max(finite) if finite else math.nan,
                    "metrics": metrics,
                    "adaptive_share": statistics.fmean(r.adaptive_share for r in results),
                    "final_loss": statistics.fmean(r.final_loss for r in results),
                    "seconds": sum(r.seconds for r in results),
                    "in_range": eps in inside,
                }
            )
    finally:
        if bar is not None:
            bar.close()

    best = None
    for r in runs:
        if best is None or task.better(r["metric"], best["metric"]):
            best = r
    assert best is not None
    best_ok = math.isfinite(best["metric"])
    # Equal means are a tie, common with a small validation set; the range "holds the best"
    # when searching only inside it reaches the best value, i.e. when any tied ε is inside.
    tied = [r for r in runs if best_ok and r["metric"] == best["metric"]]
    tied_inside = [r for r in tied if r["in_range"]]
    if tied_inside:
        best = tied_inside[0]
    spread = [r["eps"] for r in runs if math.isfinite(r["metric"]) and _overlaps(r, best, task.higher_is_better)]
    seconds = time.perf_counter() - t_start

    unit = "%" if task.metric == "accuracy" else ""
    table = [
        [
            f"{r['eps']:.0e}",
            f"{r['metric']:.2f}{unit}" if math.isfinite(r["metric"]) else "nan",
            f"{r['metric_min']:.2f} .. {r['metric_max']:.2f}" if math.isfinite(r["metric_min"]) else "-",
            f"{100 * r['adaptive_share']:.1f}%" if math.isfinite(r["adaptive_share"]) else "-",
            "yes" if r["in_range"] else "no",
            ("<- best" if len(tied) == 1 else "<- best (tie)") if any(r is t for t in tied) else "",
        ]
        for r in runs
    ]
    print()
    print(
        _table(
            ["eps", f"{task.metric} (mean)", f"min .. max over {len(tasks)}", "share > eps", "in range", ""],
            table,
            "lrrrll",
        )
    )
    print()
    if best_ok:
        verdict = "inside" if best["in_range"] else "OUTSIDE"
        if len(tied) == 1:
            print(
                f"best ε: {best['eps']:.0e} ({task.metric} {best['metric']:.2f}{unit}), {verdict} the estimated range "
                f"[{rng.low:.0e}, {rng.high:.0e}]"
            )
        else:
            print(
                f"best ε: a tie between {_decades([r['eps'] for r in tied])} ({task.metric} {best['metric']:.2f}{unit}); "
                f"inside the estimated range [{rng.low:.0e}, {rng.high:.0e}]: "
                f"{_decades([r['eps'] for r in tied_inside]) or 'none'}"
            )
        print(f"ε values whose seed range overlaps the best's: {_decades(spread)}")
    else:
        print("best ε: none (every run diverged)")
    saved = len(grid) - len(inside)
    narrower = len(grid) / len(rng.candidates)
    print(
        f"grid: {len(grid)} points, of which {len(inside)} lie in the range ({saved} saved); the range spans "
        f"{len(rng.candidates)} decades: {narrower:.2f}x narrower than the grid (the paper claims at least 2x)"
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "fasthist_version": __version__,
        "command": "sweep",
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
        "saved": saved,
        "narrowing": narrower,  # len(grid) / number of candidate decades
        "runs": runs,
        "best_eps": best["eps"] if best_ok else None,
        "best_metric": best["metric"] if best_ok else None,
        "best_inside": bool(best["in_range"]) if best_ok else None,
        "best_tied": [r["eps"] for r in tied],
        "within_noise_of_best": spread,
        "seconds": seconds,
    }
    _write_json(out / "sweep.json", data)
    payload = json.loads(json.dumps(_clean(data)))
    shown = best["eps"] if best_ok and best["eps"] in traces else grid[0]

    def sweep_png(path: str) -> None:
        from . import plot

        plot.sweep(payload, path=path)

    def quantiles_png(path: str) -> None:
        from . import plot

        plot.quantiles(
            traces[shown], eps=shown, title=f"√v̂ quantiles while training {args.task}, ε={shown:.0e}", path=path
        )

    figures = _plots(
        out, [("sweep.png", sweep_png), *([("quantiles.png", quantiles_png)] if traces else [])], args.no_figures
    )
    total = time.perf_counter() - t_start
    print(f"wrote {', '.join(str(out / f) for f in ['sweep.json', *figures])}  ({total:.1f} s)")
    return 0


def _overlaps(r: dict, best: dict, higher: bool) -> bool:
    """Whether run ``r``'s best seed reaches the best run's worst seed."""
    if higher:
        return r["metric_max"] >= best["metric_min"]
    return r["metric_min"] <= best["metric_max"]


# -- bench -------------------------------------------------------------------------------
def _bench_params(total: int, device: str) -> list[torch.Tensor]:
    """A model-like mix: a few big matrices, some middling ones, many small vectors."""
    shares = [0.35, 0.2, 0.15, 0.1, 0.08, 0.05, 0.04, 0.03]
    sizes = [max(1, int(total * s)) for s in shares]
    small = max(1, total - sum(sizes))
    sizes += [max(1, small // 8)] * 8
    g = torch.Generator().manual_seed(0)
    params = []
    for n in sizes:
        p = torch.randn(n, generator=g).to(device).requires_grad_()
        p.grad = torch.randn(n, generator=g).to(device) * 1e-3
        params.append(p)
    return params


def _time_steps(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        opt.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps


def cmd_bench(args: argparse.Namespace) -> int:
    from .adam import Adam

    device = _device(args.device)
    params = _bench_params(args.params, device)
    configs: list[tuple[str, Any]] = [
        ("torch.optim.Adam", lambda: torch.optim.Adam(params, lr=1e-3)),
        ("fasthist.Adam (track=False)", lambda: Adam(params, lr=1e-3, track=False)),
        ("fasthist.Adam", lambda: Adam(params, lr=1e-3)),
        ("torch.optim.Adam (foreach)", lambda: torch.optim.Adam(params, lr=1e-3, foreach=True)),
        ("fasthist.Adam (foreach)", lambda: Adam(params, lr=1e-3, foreach=True)),
    ]
    rounds = 3
    best: dict[str, float] = {}
    bar = _bar(rounds * len(configs), args.quiet, "bench")
    query = math.inf
    try:
        for _ in range(rounds):  # interleaved rounds, best of each: robust to a busy machine
            for name, make in configs:
                opt = make()
                best[name] = min(best.get(name, math.inf), _time_steps(opt, args.steps, device))
                if name == "fasthist.Adam":
                    t0 = time.perf_counter()
                    opt.eps_range()  # type: ignore[attr-defined]
                    query = min(query, time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    base = {"": best["torch.optim.Adam"], "foreach": best["torch.optim.Adam (foreach)"]}
    print(f"fasthist bench: {args.params:,} parameters in {len(params)} tensors, float32, {device}")
    print(
        f"backend: {os.environ.get('FASTHIST_BACKEND', 'auto')}, {torch.get_num_threads()} CPU thread(s), "
        f"best of {rounds} rounds of {args.steps} steps"
    )
    print()
    rows = []
    for name, _ in configs:
        ref = base["foreach"] if "foreach" in name else base[""]
        baseline = "torch.optim.Adam (foreach)" if "foreach" in name else "torch.optim.Adam"
        rows.append([name, f"{1e3 * best[name]:.2f}", f"{best[name] / ref:.2f}", baseline])
    rows.append(["opt.eps_range() (one query)", f"{1e3 * query:.2f}", f"{query / base['']:.2f}", "torch.optim.Adam"])
    print(_table(["step", "ms", "ratio", "vs"], rows, "lrrl"))
    return 0


# -- entry point -------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"eps-range": cmd_eps_range, "sweep": cmd_sweep, "bench": cmd_bench}
    previous_threads = torch.get_num_threads()
    # With more threads than free cores, every small op waits for a descheduled thread:
    # on a busy 2-core machine 2 threads made LSTM steps 80x and `bench` 16x slower than 1.
    torch.set_num_threads(args.threads)
    try:
        return commands[args.command](args)
    except _UsageError as e:
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


if __name__ == "__main__":
    sys.exit(main())
