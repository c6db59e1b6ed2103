"""Figures of sqrt(v_hat) histograms, in the style of Silva & Rodriguez (2024).

- :func:`histograms`: per-tensor gradient magnitude histograms on a log axis, ε as a
  vertical line, the estimated ε range shaded, the share right of ε in each title;
- :func:`adaptability`: the share of each tensor's sqrt(v_hat) above ε, as a function of ε;
- :func:`quantiles`: per-tensor quantile trajectories over training steps
  (from a :class:`fasthist.QuantileRecorder`);
- :func:`sweep`: the validation metric per ε of a grid search, with the estimated range.

Every function returns a :class:`matplotlib.figure.Figure` (built without pyplot, so no
GUI backend is touched and nothing is kept alive by a global figure manager) and saves it
as PNG when ``path`` is given. matplotlib is imported here only: ``import fasthist`` never
needs it (it comes with the ``[demo]`` extra).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .bins import LogBins
from .eps import EpsRange
from .histogram import Histogram, batched_fraction_above, batched_quantile, int_arg

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .recorder import QuantileRecorder, QuantileTrace

__all__ = ["histograms", "adaptability", "quantiles", "sweep"]

_EPS_COLOR = "#d62728"
_RANGE_COLOR = "#2ca02c"
_PCT_LABEL = "the tensor's 2% and 98% points (zeros dropped)"
_DEAD_COLOR = "#ff7f0e"
_DEAD_LABEL = "numerically dead (rounding noise)"


def _check_eps(eps: float | None) -> None:
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"Invalid eps: {eps!r}; expected a positive finite number or None")


def _figure(nrows: int = 1, ncols: int = 1, *, width: float = 4.0, height: float = 3.0) -> tuple[Figure, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("fasthist.plot needs matplotlib: pip install matplotlib (or -e '.[demo]')") from e
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, path: str | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _as_hists(source: Any, window: str) -> dict[str, Histogram]:
    if isinstance(source, Histogram):
        return {"all tensors": source}
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "histograms"):
        return source.histograms(window=window)
    raise TypeError(
        f"expected a fasthist optimizer, a dict of Histogram or a Histogram, but got {type(source).__name__}"
    )


def _bound_setters(eps_range: EpsRange | None) -> dict[str, str]:
    """``{name: "sets the low bound"}`` (or high, or both) for the tensors that set the
    bounds of ``eps_range``, then those that set the paper's rule's bounds where that
    range differs (``exclude=`` or ``drop_dead``), as the CLI prints both."""
    if eps_range is None:
        return {}
    paper = eps_range.paper
    sides = [("low", eps_range.low_tensor), ("high", eps_range.high_tensor)]
    if paper is not None:
        sides += [("paper's low", paper.low_tensor), ("paper's high", paper.high_tensor)]
    roles: dict[str, list[str]] = {}
    for side, name in sides:
        if name and not any(side.endswith(s) for s in roles.get(name, [])):
            roles.setdefault(name, []).append(side)
    return {n: f"sets the {' and '.join(s)} bound" for n, s in roles.items()}


def _select(
    hists: Mapping[str, Any], names: Sequence[str] | None, limit: int, keep: Sequence[str] = ()
) -> tuple[list[str], str]:
    """The names to draw and a line saying what was left out ("" when nothing was).

    ``names`` given: exactly those. Else at most ``limit`` in the source's order: the ones
    in ``keep`` (the tensors that set the range bounds) always, then the first others."""
    if names is not None:
        missing = [n for n in names if n not in hists]
        if missing:
            raise KeyError(f"no histogram named {missing[0]!r}; have {list(hists)[:5]}")
        return list(names), ""
    keep = [n for n in keep if n in hists]
    room = max(limit - len(keep), 0)
    others = [n for n in hists if n not in keep][:room]
    chosen = [n for n in hists if n in keep or n in others]
    left = len(hists) - len(chosen)
    if not left:
        return chosen, ""
    setters = f"the {len(keep)} setting the range bounds, then " if keep else ""
    note = (
        f"{len(chosen)} of {len(hists)} tensors shown ({setters}the first {len(others)} in order); "
        f"{left} left out (names= or max_tensors= to pick)"
    )
    return chosen, note


def _mark(ax: Axes, eps: float | None, eps_range: EpsRange | None, *, label: bool) -> None:
    if eps_range is not None:
        ax.axvspan(
            eps_range.low,
            eps_range.high,
            color=_RANGE_COLOR,
            alpha=0.12,
            label=f"range [{eps_range.low:.0e}, {eps_range.high:.0e}]" if label else None,
        )
    if eps is not None:
        ax.axvline(eps, color=_EPS_COLOR, ls="--", lw=1.2, label=f"ε = {eps:.0e}" if label else None)


def _figure_legend(fig: Figure, axes: Any, ncols: int = 3) -> None:
    """One legend for the whole figure, below the panels (never over a panel's data), with
    each label once."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=ncols, fontsize=7)


def _log_part(h: Histogram, per_binade: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts and edges of the log bins, adjacent bins merged to ``per_binade`` per
    binade (merging whole bins: each count still belongs to the bin it was recorded in)."""
    counts, edges = h.to_numpy()
    step = max(1, (1 << h.bins.mantissa_bits) // max(1, per_binade))
    if step > 1:
        counts = counts.reshape(-1, step).sum(axis=1)
        edges = edges[::step]
    return counts, edges


def _padded_xlim(lo: float, hi: float, eps: float | None, eps_range: EpsRange | None) -> tuple[float, float]:
    """x limits that show the data ``[lo, hi]``, ``eps`` and the range, with a factor 3 margin."""
    marks = [v for v in (eps, eps_range.low if eps_range else None, eps_range.high if eps_range else None) if v]
    return min([lo, *marks]) / 3, max([hi, *marks]) * 3


def _draw_histogram(
    ax: Axes,
    name: str,
    h: Histogram,
    eps: float | None,
    eps_range: EpsRange | None,
    dead: int,
    per_binade: int,
    role: str = "",
) -> tuple[float, float] | None:
    """One panel of :func:`histograms`: the log bins as shares of the tensor's elements (its
    ``dead`` values, bins wholly below ``eps_range.dead_floor``, in orange), its 2% and 98%
    points, ``eps`` and the range, and the title (with ``role``: which bound the tensor
    sets). Returns the extent of the nonzero bins (lower edge of the first, upper edge of
    the last), None when all are empty."""
    counts, edges = _log_part(h, per_binade)
    n = max(h.count, 1)
    nz = np.nonzero(counts)[0]
    if dead:
        # the numerically dead part (bins wholly below the floor) in its own colour
        below = edges[1:] <= eps_range.dead_floor  # type: ignore[union-attr]
        ax.stairs(np.where(below, counts, 0) / n, edges, fill=True, color=_DEAD_COLOR, alpha=0.9, label=_DEAD_LABEL)
        counts = np.where(below, 0, counts)
    ax.stairs(counts / n, edges, fill=True, color="#1f77b4", alpha=0.8)
    extent = None
    if len(nz):
        extent = (edges[nz[0]], edges[nz[-1] + 1])
        q = batched_quantile(
            h.counts.unsqueeze(0).cpu(), torch.tensor([0.02, 0.98], dtype=torch.float64), h.bins, exclude_zeros=True
        )[0]
        for k, v in enumerate(q.tolist()):
            ax.axvline(v, color="#555555", ls=":", lw=1.0, label=_PCT_LABEL if k == 0 else None)
    _mark(ax, eps, eps_range, label=True)
    ax.set_xscale("log")
    zero = h.zero_count / n
    above = f", {100 * h.fraction_above(eps):.0f}% > ε" if eps is not None else ""
    flag = f", {100 * dead / max(h.count - h.zero_count, 1):.0f}% dead" if dead else ""
    title = f"{name} ({h.count:,}; {100 * zero:.0f}% zero{flag}{above})"
    ax.set_title(f"{title}\n{role}" if role else title, fontsize=8, fontweight="bold" if role else "normal")
    if dead:
        ax.title.set_color(_DEAD_COLOR)
    ax.tick_params(labelsize=7)
    return extent


def histograms(
    source: Any,
    *,
    eps: float | None = 1e-8,
    eps_range: EpsRange | None = None,
    names: Sequence[str] | None = None,
    window: str = "step",
    max_tensors: int = 16,
    per_binade: int = 8,
    ncols: int = 4,
    title: str | None = None,
    path: str | None = None,
) -> Figure:
    """Per-tensor histograms of sqrt(v_hat) (share of the tensor's elements per bin, log
    x axis), with ``eps`` as a red dashed line and ``eps_range`` shaded green; dotted
    lines mark the tensor's own 2% and 98% points (zeros excluded). Each title gives the
    tensor's size, its share of exact zeros and its share above ``eps``. Values that
    ``eps_range`` flags as numerically dead are drawn in orange, with the title.

    ``source``: a fasthist optimizer (its ``histograms(window=...)``), a dict of
    :class:`~fasthist.Histogram` by name, or one Histogram. Without ``names``, at most
    ``max_tensors`` panels: the tensors that set ``eps_range``'s bounds always (their
    titles say which), then the first others in order; the figure says how many were left out.
    """
    _check_eps(eps)
    max_tensors = int_arg(max_tensors, "max_tensors", 1)
    per_binade = int_arg(per_binade, "per_binade", 1)
    hists = _as_hists(source, window)
    roles = _bound_setters(eps_range)
    chosen, note = _select(hists, names, max_tensors, list(roles))
    if not chosen:
        raise ValueError("nothing to plot: no histogram (has the optimizer taken a step?)")
    ncols = min(int_arg(ncols, "ncols", 1), len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig, axes = _figure(nrows, ncols, width=3.6, height=2.6)
    dead_rows = {r.name: r.dead for r in eps_range.rows} if eps_range is not None else {}
    lo_all, hi_all = math.inf, 0.0
    for ax, name in zip(axes.flat, chosen, strict=False):
        extent = _draw_histogram(
            ax, name, hists[name], eps, eps_range, dead_rows.get(name, 0), per_binade, roles.get(name, "")
        )
        if extent is not None:
            lo_all, hi_all = min(lo_all, extent[0]), max(hi_all, extent[1])
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    if math.isfinite(lo_all):
        xlim = _padded_xlim(lo_all, hi_all, eps, eps_range)
        for ax in axes.flat:
            ax.set_xlim(*xlim)
    for ax in axes[-1]:
        ax.set_xlabel("√v̂", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of elements", fontsize=8)
    _figure_legend(fig, axes.flat[: len(chosen)])
    fig.suptitle(_with_note(title or "Gradient magnitude histograms (√v̂ per tensor)", note, ncols), fontsize=10)
    return _save(fig, path)


def _with_note(title: str, note: str, ncols: int) -> str:
    """``title``, then ``note`` (what was left out) wrapped to the width of ``ncols``
    panels (about 40 characters of a 10-point title each)."""
    return "\n".join([title, *textwrap.wrap(note, 40 * ncols, break_on_hyphens=False)])


def _shares_above_edges(hists: Sequence[Histogram]) -> tuple[np.ndarray, np.ndarray]:
    """``(x, shares)``: every log-bin edge ``x`` and, per histogram, the share of its
    elements above each (:func:`~fasthist.histogram.batched_fraction_above`, exact at the
    edges: a bin lies wholly on one side of each of its edges)."""
    bins: LogBins = hists[0].bins
    counts = torch.stack([h.counts.detach().cpu() for h in hists])
    x = bins.edges
    return x.numpy(), batched_fraction_above(counts, x.expand(len(hists), -1), bins).nan_to_num(0.0).numpy()


def adaptability(
    source: Any,
    *,
    eps: float | None = 1e-8,
    eps_range: EpsRange | None = None,
    names: Sequence[str] | None = None,
    window: str = "step",
    max_tensors: int = 16,
    title: str | None = None,
    path: str | None = None,
) -> Figure:
    """Adaptability per tensor: the share of its sqrt(v_hat) above ε, for every ε (log x).
    Where a curve is near 1 the optimizer is fully adaptive for that tensor; near 0 it is SGD with
    momentum at learning rate ``lr/ε``. Exact at the bin edges, where it is evaluated.
    Which tensors, and the note on those left out: as :func:`histograms` (the ones that set
    ``eps_range``'s bounds are drawn thicker, their legend entries say which bound)."""
    _check_eps(eps)
    max_tensors = int_arg(max_tensors, "max_tensors", 1)
    hists = _as_hists(source, window)
    roles = _bound_setters(eps_range)
    chosen, note = _select(hists, names, max_tensors, list(roles))
    if not chosen:
        raise ValueError("nothing to plot: no histogram (has the optimizer taken a step?)")
    fig, axes = _figure(width=6.4, height=3.8)
    ax = axes[0, 0]
    lo_all, hi_all = math.inf, 0.0
    x, shares = _shares_above_edges([hists[n] for n in chosen])
    for name, share in zip(chosen, shares, strict=True):
        moving = np.nonzero(np.diff(share))[0]
        if len(moving):
            lo_all, hi_all = min(lo_all, x[moving[0]]), max(hi_all, x[moving[-1] + 1])
        role = f", {roles[name]}" if name in roles else ""
        ax.plot(x, share, lw=2.4 if role else 1.3, label=f"{name} ({hists[name].count:,}{role})")
    _mark(ax, eps, eps_range, label=True)
    ax.set_xscale("log")
    if math.isfinite(lo_all):
        ax.set_xlim(*_padded_xlim(lo_all, hi_all, eps, eps_range))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("ε")
    ax.set_ylabel("share of √v̂ above ε (adaptive)")
    ax.grid(True, which="major", alpha=0.3)
    # beside the panel, never over the curves or the ε line
    fig.legend(
        *ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7, ncols=2 if len(chosen) > 16 else 1
    )
    ax.set_title(title or "Adaptability: how much of each tensor the optimizer normalises", fontsize=10)
    if note:  # below everything: the legend takes the top right
        fig.supxlabel(textwrap.fill(note, 90), fontsize=8, color="#444444")
    return _save(fig, path)


def quantiles(
    trace: QuantileTrace | QuantileRecorder,
    *,
    names: Sequence[str] | None = None,
    eps: float | None = None,
    max_tensors: int = 16,
    ncols: int = 4,
    title: str | None = None,
    path: str | None = None,
) -> Figure:
    """Per-tensor quantile trajectories over steps, one panel per tensor (shared log y):
    the middle quantile as a line, the band between the lowest and highest recorded
    quantiles shaded, ``eps`` dashed."""
    _check_eps(eps)
    max_tensors = int_arg(max_tensors, "max_tensors", 1)
    if hasattr(trace, "trace"):
        trace = trace.trace()  # type: ignore[union-attr]
    all_names = list(trace.names)  # type: ignore[union-attr]
    chosen, note = _select(dict.fromkeys(all_names), names, max_tensors)
    if not chosen or len(trace.steps) == 0:  # type: ignore[union-attr]
        raise ValueError("nothing to plot: the trace is empty")
    steps, values, qs = trace.steps, trace.values, trace.qs  # type: ignore[union-attr]
    mid = int(np.argmin([abs(q - 0.5) for q in qs]))
    ncols = min(int_arg(ncols, "ncols", 1), len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig, axes = _figure(nrows, ncols, width=3.4, height=2.4)
    shown = values[:, [all_names.index(n) for n in chosen], :]
    positive = shown[np.isfinite(shown) & (shown > 0)]
    for ax, name in zip(axes.flat, chosen, strict=False):
        i = all_names.index(name)
        (line,) = ax.plot(steps, values[:, i, mid], lw=1.3, color="#1f77b4", label=name)
        if len(qs) > 1:
            ax.fill_between(steps, values[:, i, 0], values[:, i, -1], color="#1f77b4", alpha=0.2, lw=0)
        if eps is not None:
            ax.axhline(eps, color=_EPS_COLOR, ls="--", lw=1.2, label=f"ε = {eps:.0e}")
        ax.set_yscale("log")
        if len(positive):
            lo, hi = positive.min(), positive.max()
            if eps is not None:
                lo, hi = min(lo, eps), max(hi, eps)
            ax.set_ylim(lo / 3, hi * 3)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("√v̂", fontsize=8)
    band = f"q{qs[0]:g}–q{qs[-1]:g} shaded, " if len(qs) > 1 else ""
    fig.suptitle(_with_note(title or "√v̂ over training", note, ncols), fontsize=10)
    axes.flat[0].text(0.02, 0.02, f"{band}q{qs[mid]:g} line", transform=axes.flat[0].transAxes, fontsize=7, va="bottom")
    return _save(fig, path)


def sweep(result: Mapping[str, Any], *, title: str | None = None, path: str | None = None) -> Figure:
    """The grid search of ``fasthist sweep`` (its ``sweep.json`` as a dict): the validation
    metric per ε (mean and spread over seeds), the estimated range shaded, every tied best
    ε starred; below, the share of sqrt(v_hat) above ε at the end of each run. The title is
    the sweep's ``verdict``, the line it printed."""
    runs = list(result["runs"])
    if not runs:
        raise ValueError("nothing to plot: the sweep has no runs")
    fig, axes = _figure(2, 1, width=6.4, height=2.6)
    ax, ax2 = axes[0, 0], axes[1, 0]
    x = np.array([r["eps"] for r in runs], dtype=float)
    y = np.array([np.nan if r["metric"] is None else r["metric"] for r in runs], dtype=float)
    lo = np.array([np.nan if r.get("metric_min") is None else r["metric_min"] for r in runs], dtype=float)
    hi = np.array([np.nan if r.get("metric_max") is None else r["metric_max"] for r in runs], dtype=float)
    rng = result.get("eps_range")
    for a in (ax, ax2):
        if rng:
            a.axvspan(rng["low"], rng["high"], color=_RANGE_COLOR, alpha=0.12, label="estimated range")
        a.set_xscale("log")
        a.grid(True, which="major", alpha=0.3)
    ax.plot(x, y, "o-", color="#1f77b4", label=f"{result.get('metric', 'metric')} (mean)")
    if np.isfinite(lo).any():
        ax.fill_between(x, lo, hi, color="#1f77b4", alpha=0.15, lw=0, label="min–max over seeds")
    # every tied best ε is starred, inside the range or not: a figure never settles a tie
    best = list(result.get("best_tied") or ([result["best_eps"]] if result.get("best_eps") is not None else []))
    if best:
        js = [int(np.argmin(np.abs(np.log(x) - math.log(b)))) for b in best]
        label = f"best ε = {best[0]:.0e}" if len(best) == 1 else f"best ε (tie): {' '.join(f'{b:.0e}' for b in best)}"
        ax.plot(x[js], y[js], "*", ms=14, color=_EPS_COLOR, ls="none", label=label)
    if result.get("metric") == "perplexity":
        ax.set_yscale("log")
    ax.set_ylabel(result.get("metric", "metric"))
    _figure_legend(fig, [ax], ncols=2)
    share = np.array([np.nan if r.get("adaptive_share") is None else r["adaptive_share"] for r in runs], dtype=float)
    ax2.plot(x, share, "s-", color="#9467bd")
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_ylabel("share √v̂ > ε\n(end of training)", fontsize=8)
    ax2.set_xlabel("ε")
    # the verdict's own words (fasthist sweep writes them with the function that prints them)
    verdict = result.get("verdict")
    head = f"ε sweep on {result.get('task', '?')}"
    fig.suptitle(title or (f"{head}\n{verdict}" if verdict else head), fontsize=9, wrap=True)
    return _save(fig, path)
