"""``fasthist bench``: time of one step of fasthist's default optimizer
(:func:`fasthist.catalog.default`) against the torch optimizer it replaces, as ratios: the
default step against torch's default, ``fused=True`` against torch's fused step."""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from ..progress import progress_bar
from .args import positive_int, resolve_device
from .output import table

__all__ = ["add_parser", "bench_params", "default_pair", "run", "time_steps"]

ROUNDS = 3  # interleaved rounds, best of each: robust to a busy machine


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        parents=parents,
        help="overhead of tracking against the torch optimizer",
        description="Time one step of fasthist's default optimizer against the torch optimizer it replaces "
        "on this machine.",
    )
    p.add_argument("--params", type=positive_int, default=4_000_000, help="total parameters (default: 4,000,000)")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per round (default: 20)")


def bench_params(total: int, device: str) -> list[torch.Tensor]:
    """About ``total`` parameters in a model-like mix: a few big matrices, some middling
    ones, many small vectors; each with a small random gradient."""
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


def time_steps(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    """Seconds per ``opt.step()``, the mean of ``steps`` after 3 untimed ones."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        opt.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps


def default_pair() -> tuple[Any, Any]:
    """fasthist's default optimizer class (:func:`fasthist.catalog.default`) and the
    ``torch.optim`` class it is a drop-in for (the same name)."""
    from .. import catalog

    ours = catalog.optimizer_class(catalog.default())
    return ours, getattr(torch.optim, ours.__name__)


def _configs(params: list[torch.Tensor]) -> list[tuple[str, Callable[[], torch.optim.Optimizer]]]:
    """(label, factory) of each timed step; the first is torch's default step (the
    baseline), the third fasthist's tracked one (whose ``eps_range()`` is timed too)."""
    ours, theirs = default_pair()
    torch_name, name = f"torch.optim.{theirs.__name__}", f"fasthist.{ours.__name__}"
    return [
        (torch_name, lambda: theirs(params, lr=1e-3)),
        (f"{name} (track=False)", lambda: ours(params, lr=1e-3, track=False)),
        (name, lambda: ours(params, lr=1e-3)),
        (f"{torch_name} (fused)", lambda: theirs(params, lr=1e-3, fused=True)),
        (f"{name} (fused, track=False)", lambda: ours(params, lr=1e-3, fused=True, track=False)),
        (f"{name} (fused)", lambda: ours(params, lr=1e-3, fused=True)),
    ]


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    params = bench_params(args.params, device)
    configs = _configs(params)
    torch_name, tracked = configs[0][0], configs[2][0]
    best: dict[str, float] = {}
    bar = progress_bar(ROUNDS * len(configs), "bench", enabled=not args.quiet)
    query = math.inf
    try:
        for _ in range(ROUNDS):
            for name, make in configs:
                opt = make()
                best[name] = min(best.get(name, math.inf), time_steps(opt, args.steps, device))
                if name == tracked:
                    t0 = time.perf_counter()
                    opt.eps_range()  # type: ignore[attr-defined]
                    query = min(query, time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    print(f"fasthist bench: {args.params:,} parameters in {len(params)} tensors, float32, {device}")
    print(
        f"backend: {os.environ.get('FASTHIST_BACKEND', 'auto')}, {torch.get_num_threads()} CPU thread(s), "
        f"best of {ROUNDS} rounds of {args.steps} steps"
    )
    print()
    rows = []
    for name, _ in configs:
        baseline = f"{torch_name} (fused)" if "fused" in name else torch_name  # like for like
        rows.append([name, f"{1e3 * best[name]:.2f}", f"{best[name] / best[baseline]:.2f}", baseline])
    base = best[torch_name]
    rows.append(["opt.eps_range() (one query)", f"{1e3 * query:.2f}", f"{query / base:.2f}", torch_name])
    print(table(["step", "ms", "ratio", "vs"], rows, "lrrl"))
    return 0
