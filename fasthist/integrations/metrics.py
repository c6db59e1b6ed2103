"""The numbers every integration logs, computed from one host copy of the histograms.

:func:`snapshot` reads every tracked tensor's histogram once (one device-to-host copy of
the int64 counts, nothing else) with its per-tensor percentiles, computed on the device
in one batched operation. From it:

- :func:`tensor_scalars`, per tensor: ``p02``, ``p50``, ``p98`` of √v̂ with exact zeros
  dropped and rank ``floor(q*n)`` (the percentiles the ε-range rule reads, each within
  the bins' relative accuracy), and ``adaptive``: the share of *all* the tensor's
  elements (zeros included) above its param group's ε, by the library's one rule
  (:func:`fasthist.histogram.batched_fraction_above`, which states what is exact).
- :func:`summary_scalars`, over all tracked tensors: the same four of the merged
  histogram (``adaptive`` compares each element with its own group's ε), and the ε range
  of the rule (:meth:`HistogramMixin.eps_range`): ``eps_low``/``eps_high`` (rounded to
  decades, the rule's answer) and ``eps_low_raw``/``eps_high_raw``.

Where param groups track staleness (``track=("sqrt_v", "staleness")``, :mod:`fasthist.health`),
:func:`staleness_scalars` gives, per tensor tracking it, ``staleness_rms`` (its RMS
staleness, :meth:`~fasthist.queries.HistogramQueries.staleness_rms`, within 2**-(m+1) relative
of the exact one) and ``staleness_p99`` (rank ``floor(0.99 n)``, zeros included, within the
bins' relative accuracy), and over all of them ``staleness_rms_median``,
``staleness_rms_max`` and ``staleness_p99`` (of the merged histogram): one more host copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..bins import LogBins
from ..declaration import quantities
from ..eps import eps_range_from_counts, names_matching
from ..histogram import batched_count_above, batched_fraction_above, batched_quantile
from ..wrapped import unwrap

__all__ = [
    "QUANTILES",
    "STATS",
    "Selection",
    "Snapshot",
    "group_eps",
    "select",
    "snapshot",
    "staleness_counts",
    "staleness_scalars",
    "tensor_and_staleness_scalars",
    "summary_scalars",
    "tensor_scalars",
    "tracks_staleness",
]

#: The percentiles logged, and their names.
QUANTILES = (0.02, 0.5, 0.98)
STATS = ("p02", "p50", "p98", "adaptive")

#: Which tensors get per-tensor metrics: names, glob patterns, a predicate, or None (all).
Selection = str | Iterable[str] | Callable[[str], bool] | None


@dataclass(frozen=True)
class Snapshot:
    """Every tracked tensor's histogram at one moment, on the host: ``counts[i]`` (int64,
    ``bins.num_bins``) belongs to ``names[i]``, whose param group has ε ``eps[i]`` (NaN
    for an optimizer without ε); ``quantiles[i]`` are its :data:`QUANTILES` and
    ``adaptive[i]`` its share above ``eps[i]``
    (:func:`fasthist.histogram.batched_fraction_above`, NaN without ε), of the ``above[i]``
    elements above it (int64, :func:`fasthist.histogram.batched_count_above`)."""

    names: list[str]
    counts: np.ndarray
    eps: np.ndarray
    quantiles: np.ndarray
    adaptive: np.ndarray
    above: np.ndarray
    bins: LogBins


def group_eps(opt: Any, params: list[torch.Tensor | None]) -> list[float]:
    """The ε of each parameter's param group (NaN where the group has none)."""
    by_param = {}
    for group in opt.param_groups:
        eps = group.get("eps")
        for p in group["params"]:
            by_param[p] = math.nan if eps is None else float(eps)
    return [by_param.get(p, math.nan) for p in params]


def snapshot(opt: Any, window: str = "step", *, eps: float | None = None) -> Snapshot | None:
    """The histograms of ``opt`` (a fasthist optimizer or a wrapper of one) for ``window``
    ("step" or "total"), or None when no tensor has been stepped yet. ``adaptive`` is the
    share above each tensor's group ε, or above ``eps`` for every tensor when given (an
    optimizer built for a pass, whose own ε is a placeholder). The percentiles and shares
    are computed on the histograms' device, then copied to the host with the counts."""
    opt = unwrap(opt)
    names, params, counts = opt.histogram_rows(window)
    if counts is None:
        return None
    bins = opt.bins
    q = batched_quantile(counts, torch.tensor(QUANTILES, dtype=torch.float64), bins, exclude_zeros=True)
    per_tensor = group_eps(opt, params) if eps is None else [float(eps)] * len(names)
    eps_rows = torch.tensor(per_tensor, dtype=torch.float64)
    adaptive = batched_fraction_above(counts, eps_rows.to(counts.device), bins)
    above, _ = batched_count_above(counts, eps_rows.to(counts.device), bins)
    host = [t.cpu().numpy() for t in (counts, q, adaptive, above)]
    return Snapshot(list(names), host[0], eps_rows.numpy(), host[1], host[2], host[3], bins)


def tensor_scalars(snap: Snapshot) -> dict[str, dict[str, float]]:
    """``{name: {"p02": ..., "p50": ..., "p98": ..., "adaptive": ...}}`` (NaN where a
    tensor has no nonzero value, or its group no ε)."""
    out = {}
    for i, name in enumerate(snap.names):
        row = {k: float(v) for k, v in zip(STATS[:3], snap.quantiles[i], strict=True)}
        row["adaptive"] = float(snap.adaptive[i])
        out[name] = row
    return out


def summary_scalars(snap: Snapshot) -> dict[str, float]:
    """Over all tensors: ``p02``/``p50``/``p98`` of the merged histogram, ``adaptive``,
    and the ε range ``eps_low``/``eps_high`` (decades) and ``eps_low_raw``/``eps_high_raw``
    (left out when the rule has no answer: every value so far exactly zero)."""
    merged = torch.from_numpy(snap.counts.sum(axis=0, keepdims=True))
    q = batched_quantile(merged, torch.tensor(QUANTILES, dtype=torch.float64), snap.bins, exclude_zeros=True)
    out = {k: float(v) for k, v in zip(STATS[:3], q[0].tolist(), strict=True)}
    # every element compared with its own group's ε: the counts above, over all elements
    total = int(snap.counts.sum())
    ok = total and np.isfinite(snap.eps).all()
    out["adaptive"] = int(snap.above.sum()) / total if ok else math.nan
    try:
        rng = eps_range_from_counts(snap.names, torch.from_numpy(snap.counts), snap.bins)
    except RuntimeError:  # nothing but exact zeros recorded: the rule has no range yet
        return out
    out.update(eps_low=rng.low, eps_high=rng.high, eps_low_raw=rng.low_raw, eps_high_raw=rng.high_raw)
    return out


def tracks_staleness(opt: Any) -> bool:
    """Whether any param group of ``opt`` (a fasthist optimizer or a wrapper) tracks staleness."""
    return any("staleness" in quantities(g.get("track", True)) for g in unwrap(opt).param_groups)


def staleness_scalars(opt: Any, window: str = "step") -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """``({name: {"staleness_rms": ..., "staleness_p99": ...}}, summary)`` of the tensors of
    ``opt`` that track staleness (module docstring), computed on the histograms' device and
    copied to the host once; both empty where none does or none was stepped. NaN for a
    tensor with nothing counted."""
    opt = unwrap(opt)
    if not tracks_staleness(opt):
        return {}, {}
    names, rms = opt.staleness_rms(window)
    if not names:
        return {}, {}
    counts = opt.histogram_rows(window, quantity="staleness").counts
    q99 = torch.tensor([0.99], dtype=torch.float64)
    per = batched_quantile(counts, q99, opt.bins)[:, 0]
    merged = batched_quantile(counts.sum(dim=0, keepdim=True), q99, opt.bins)[0]
    host = torch.cat([rms.estimate, per, merged]).cpu().tolist()
    n = len(names)
    rows = {name: {"staleness_rms": host[i], "staleness_p99": host[n + i]} for i, name in enumerate(names)}
    finite = [v for v in host[:n] if math.isfinite(v)]
    summary = {"staleness_p99": host[-1]}
    if finite:
        summary.update(staleness_rms_median=float(np.median(finite)), staleness_rms_max=max(finite))
    return rows, summary


def tensor_and_staleness_scalars(opt: Any, snap: Snapshot, window: str) -> dict[str, dict[str, float]]:
    """:func:`tensor_scalars` of ``snap``, with :func:`staleness_scalars` added to each row
    of a tensor that tracks staleness."""
    out = tensor_scalars(snap)
    for name, row in staleness_scalars(opt, window)[0].items():
        out.setdefault(name, {}).update(row)
    return out


def staleness_counts(opt: Any, window: str) -> tuple[list[str], np.ndarray]:
    """The staleness histograms of ``opt``'s tensors that track it, on the host (one copy):
    ``(names, int64 [R, num_bins])``, empty where none does or none was stepped."""
    opt = unwrap(opt)
    if not tracks_staleness(opt):
        return [], np.zeros((0, opt.bins.num_bins), dtype=np.int64)
    names, _, counts = opt.histogram_rows(window, quantity="staleness")
    if counts is None:
        return [], np.zeros((0, opt.bins.num_bins), dtype=np.int64)
    return list(names), counts.cpu().numpy()


def select(names: list[str], tensors: Selection, max_tensors: int | None) -> list[str] | None:
    """The names among ``names`` that ``tensors`` picks (names, glob patterns or a predicate;
    None: all), or None when they are more than ``max_tensors``. A pattern that matches no
    name is an error (a typo must not silently log nothing)."""
    if tensors is None:
        chosen = list(names)
    else:
        chosen = [
            n for n, m in zip(names, names_matching(names, tensors, "tensors", "tracked tensor"), strict=True) if m
        ]
    return None if max_tensors is not None and len(chosen) > max_tensors else chosen
