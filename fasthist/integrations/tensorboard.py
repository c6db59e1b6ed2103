"""Log a fasthist optimizer's histograms to TensorBoard.

:func:`log_histograms` writes, per tracked tensor:

- ``fasthist/<name>``: the histogram through ``SummaryWriter.add_histogram_raw`` with the
  optimizer's own bins, edges and counts, nothing re-binned and no parameter or state
  copied (only the int64 counts are read back, once for all tensors). Buckets are the
  exact-zero bin (right limit 0), the below-range bin (limit ``bins.low``), every log bin
  (limit its upper edge) and the above-range bin (limit: the largest double), trimmed of
  empty buckets at both ends; the counts sum to the tensor's size. ``sum`` and
  ``sum_squares`` are computed from the bins' representative values (so within the bins'
  relative accuracy); non-finite values, if any, are counted in the top bucket.
  ``scale="log10"`` writes the same buckets on a log10 axis, which TensorBoard's linear
  display shows far more legibly for values spanning many decades: the limits are
  ``log10`` of the edges, and zeros with below-range values go to a bucket one unit
  below ``log10(bins.low)``, above-range and non-finite ones to a bucket one unit above
  ``log10(bins.high)``.
- scalars ``fasthist.p02/<name>``, ``fasthist.p50/<name>``, ``fasthist.p98/<name>``: the
  per-tensor percentiles the ε-range rule reads (exact zeros dropped, index
  ``floor(q*n)``), and ``fasthist.adaptive/<name>``: the share of all the tensor's
  elements above its param group's ε (how adaptive the optimizer is for it).

Where the tensor tracks staleness (``track=("sqrt_v", "staleness")``), also
``fasthist.staleness/<name>``, its staleness histogram (same buckets), and the scalars
``fasthist.staleness_rms/<name>`` and ``fasthist.staleness_p99/<name>``
(:func:`fasthist.integrations.metrics.staleness_scalars`).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from .metrics import snapshot, staleness_counts, tensor_and_staleness_scalars

__all__ = ["log_histograms"]


def _buckets(c: np.ndarray, bins: Any, scale: str) -> tuple[list[float], list[float], float, float]:
    """(limits, counts, min, max) with empty buckets trimmed at both ends."""
    edges = bins.edges.numpy()
    log = c[bins.FIRST_LOG : bins.above]
    top = c[bins.above] + c[bins.nonfinite]
    if scale == "linear":
        limits = np.concatenate([[0.0, bins.low], edges[1:], [sys.float_info.max]])
        counts = np.concatenate([[c[bins.ZERO], c[bins.BELOW]], log, [top]])
        lefts = np.concatenate([[0.0, 0.0], edges[:-1], [bins.high]])
    else:
        le = np.log10(edges)
        limits = np.concatenate([[le[0]], le[1:], [le[-1] + 1.0]])
        counts = np.concatenate([[c[bins.ZERO] + c[bins.BELOW]], log, [top]])
        lefts = np.concatenate([[le[0] - 1.0], le[:-1], [le[-1]]])
    nz = np.nonzero(counts)[0]
    if len(nz) == 0:
        return [], [], 0.0, 0.0
    a, b = nz[0], nz[-1] + 1
    return limits[a:b].tolist(), counts[a:b].astype(np.float64).tolist(), float(lefts[a]), float(limits[b - 1])


def _bin_values(bins: Any, scale: str) -> np.ndarray:
    """Each bin's value on the axis of ``scale``, for ``sum`` and ``sum_squares``: its
    representative (``"linear"``), or that value's log10 (``"log10"``), with zeros and
    below-range values at ``log10(bins.low) - 0.5``; non-finite ones count as 0."""
    reps = bins.representatives.numpy()
    if scale == "linear":
        return np.where(np.isfinite(reps), reps, 0.0)
    vals = np.where(reps > 0, np.log10(np.where(reps > 0, reps, 1.0)), math.log10(bins.low) - 0.5)
    return np.where(np.isfinite(vals), vals, 0.0)


def _add_histogram(writer: Any, tag: str, c: np.ndarray, bins: Any, scale: str, vals: np.ndarray, step: int) -> None:
    """One tensor's counts ``c`` as a raw TensorBoard histogram (nothing when all are empty)."""
    limits, bucket_counts, lo, hi = _buckets(c, bins, scale)
    if not limits:
        return
    writer.add_histogram_raw(
        tag,
        min=lo,
        max=hi,
        num=int(c.sum()),
        sum=float((c * vals).sum()),
        sum_squares=float((c * vals * vals).sum()),
        bucket_limits=limits,
        bucket_counts=bucket_counts,
        global_step=step,
    )


def log_histograms(
    writer: Any,
    opt: Any,
    step: int,
    *,
    window: str = "step",
    scale: str = "linear",
    scalars: bool = True,
    prefix: str = "fasthist",
) -> dict[str, dict[str, float]]:
    """Log every tracked tensor's histogram (and its p2/p50/p98/adaptive-share scalars).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_histogram_raw`` and ``add_scalar``).
        opt: a fasthist optimizer, or a framework's wrapper of one (:func:`fasthist.unwrap`).
        step: the global step to log at.
        window: ``"step"`` (the latest update) or ``"total"`` (summed since construction
            or ``reset_histograms()``).
        scale: ``"linear"`` (the values themselves) or ``"log10"`` (see module docstring).
        scalars: also log the per-tensor scalars.
        prefix: tag prefix.

    Returns the logged scalars, ``{name: {"p02": ..., "p50": ..., "p98": ..., "adaptive": ...}}``
    (with ``"staleness_rms"`` and ``"staleness_p99"`` where the tensor tracks staleness).
    """
    if scale not in ("linear", "log10"):
        raise ValueError(f"Invalid scale: {scale!r}; expected 'linear' or 'log10'")
    snap = snapshot(opt, window)  # a framework's wrapper (Accelerate, Lightning, ...) is fine too
    if snap is None:
        return {}
    vals = _bin_values(snap.bins, scale)
    out = tensor_and_staleness_scalars(opt, snap, window)
    for i, name in enumerate(snap.names):
        _add_histogram(writer, f"{prefix}/{name}", snap.counts[i], snap.bins, scale, vals, step)
    stale_names, stale = staleness_counts(opt, window)
    for i, name in enumerate(stale_names):
        _add_histogram(writer, f"{prefix}.staleness/{name}", stale[i], snap.bins, scale, vals, step)
    if scalars:
        for name in snap.names:
            for k, v in out[name].items():
                if math.isfinite(v):
                    writer.add_scalar(f"{prefix}.{k}/{name}", v, global_step=step)
    return out
