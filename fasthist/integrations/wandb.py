"""Log a fasthist optimizer's histograms to Weights & Biases.

:func:`log_histograms` logs, in one ``run.log`` call, per tracked tensor:

- ``fasthist/<name>``: ``wandb.Histogram(np_histogram=(counts, edges))`` built from the
  optimizer's own bins (nothing re-sampled, no parameter or state copied; only the int64
  counts are read back, once for all tensors). W&B takes at most 512 buckets, and the
  default ``LogBins`` have 2,592 log bins, so :func:`wandb_buckets`:

  1. trims the empty log bins at both ends;
  2. merges runs of ``2**j`` adjacent log bins, aligned to multiples of ``2**j`` in the
     bin index, with the smallest ``j`` that fits: the merged buckets are then exactly the
     log bins of ``LogBins(min_exponent, max_exponent, mantissa_bits - j)`` (coarser, with
     that relative accuracy), counts summed, never re-sampled;
  3. adds the explicit bins as buckets of their own at both ends, when not empty: exact
     zeros together with below-range values (all lie in ``[0, low)``) in a bucket from 0
     (``"log10"``: from ``log10(low) - 1``) to the first log edge kept; above-range values
     together with non-finite ones in a bucket from the last log edge kept to the largest
     double (``"log10"``: ``log10(high) + 1``). Non-finite values are counted there (as in
     the TensorBoard integration) so that the counts always sum to the tensor's size.

  ``scale="log10"`` puts the edges on a log10 axis (W&B draws histograms on a linear one,
  where values spanning decades crowd into one bucket).
- the scalars of :func:`fasthist.integrations.tensorboard.log_histograms`, under the same
  keys: ``fasthist.p02/<name>``, ``fasthist.p50/<name>``, ``fasthist.p98/<name>``,
  ``fasthist.adaptive/<name>``.

Where the tensor tracks staleness (``track=("sqrt_v", "staleness")``), also
``fasthist.staleness/<name>``, its staleness histogram (same buckets), and the scalars
``fasthist.staleness_rms/<name>``, ``fasthist.staleness_p99/<name>``.

``wandb`` is imported when :func:`log_histograms` is called, not before.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from ..bins import LogBins
from .metrics import snapshot, staleness_counts, tensor_and_staleness_scalars

__all__ = ["MAX_BUCKETS", "log_histograms", "wandb_buckets"]

#: The most buckets ``wandb.Histogram`` accepts.
MAX_BUCKETS = 512


def _merged_log_bins(log: np.ndarray, edges: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero span of the log-bin counts ``log`` merged by the smallest power of two
    that leaves at most ``budget`` buckets: (counts, edges), both empty when all are 0."""
    nz = np.nonzero(log)[0]
    if len(nz) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    a, b = int(nz[0]), int(nz[-1]) + 1
    k = 1
    while (b - 1) // k - a // k + 1 > budget:
        k *= 2
    start, end = (a // k) * k, min(((b - 1) // k + 1) * k, len(log))
    counts = np.add.reduceat(log[start:end], np.arange(0, end - start, k))
    return counts, np.concatenate([edges[start:end:k], [edges[end]]])


def wandb_buckets(
    counts: np.ndarray, bins: LogBins, scale: str = "linear", max_buckets: int = MAX_BUCKETS
) -> tuple[np.ndarray, np.ndarray]:
    """One tensor's histogram ``counts`` (``bins.num_bins``) as ``(bucket_counts, edges)``
    for ``wandb.Histogram(np_histogram=...)``: at most ``max_buckets`` buckets, counts
    summing to ``counts.sum()``, edges increasing (see the module docstring)."""
    if scale not in ("linear", "log10"):
        raise ValueError(f"Invalid scale: {scale!r}; expected 'linear' or 'log10'")
    if max_buckets < 3:
        raise ValueError(f"Invalid max_buckets: {max_buckets}; expected at least 3")
    head = int(counts[bins.ZERO] + counts[bins.BELOW])
    tail = int(counts[bins.above] + counts[bins.nonfinite])
    edges = bins.edges.numpy()
    c, e = _merged_log_bins(counts[bins.FIRST_LOG : bins.above], edges, max_buckets - 2)
    if scale == "log10":
        edges, e = np.log10(edges), np.log10(e)
        bottom, top = edges[0] - 1.0, edges[-1] + 1.0
    else:
        bottom, top = 0.0, sys.float_info.max
    if len(c) == 0:  # no log bin holds anything: the explicit buckets meet at the range
        e = edges[[0]] if head else edges[[-1]]
        if head and tail:
            c, e = np.array([0]), edges[[0, -1]]
    if head:
        c, e = np.concatenate([[head], c]), np.concatenate([[bottom], e])
    if tail:
        c, e = np.concatenate([c, [tail]]), np.concatenate([e, [top]])
    return c.astype(np.int64), e.astype(np.float64)


def log_histograms(
    run: Any,
    opt: Any,
    step: int,
    *,
    window: str = "step",
    scale: str = "linear",
    scalars: bool = True,
    prefix: str = "fasthist",
    step_metric: str | None = None,
) -> dict[str, dict[str, float]]:
    """Log every tracked tensor's histogram (and its p2/p50/p98/adaptive-share scalars).

    Args:
        run: a ``wandb`` run (``wandb.init()``'s result, or ``wandb.run``).
        opt: a fasthist optimizer, or a framework's wrapper of one (:func:`fasthist.unwrap`).
        step: the step to log at: ``run.log(..., step=step)``; with ``step_metric``,
            logged as that key's value instead (for runs whose trainer defines its own
            step metric, as Hugging Face's ``"train/global_step"`` or Lightning's
            ``"trainer/global_step"``, where W&B's own step is not the global step).
        window: ``"step"`` (the latest update) or ``"total"``.
        scale: ``"linear"`` or ``"log10"`` (see the module docstring).
        scalars: also log the per-tensor scalars.
        prefix: key prefix.

    Returns the scalars, ``{name: {"p02": ..., "p50": ..., "p98": ..., "adaptive": ...}}``
    (with ``"staleness_rms"`` and ``"staleness_p99"`` where the tensor tracks staleness).
    """
    if scale not in ("linear", "log10"):
        raise ValueError(f"Invalid scale: {scale!r}; expected 'linear' or 'log10'")
    import wandb  # only when called

    snap = snapshot(opt, window)
    if snap is None:
        return {}
    out = tensor_and_staleness_scalars(opt, snap, window)
    data: dict[str, Any] = {}
    stale_names, stale = staleness_counts(opt, window)
    for tag, names, counts in ((prefix, snap.names, snap.counts), (f"{prefix}.staleness", stale_names, stale)):
        for i, name in enumerate(names):
            if counts[i].sum():
                data[f"{tag}/{name}"] = wandb.Histogram(np_histogram=wandb_buckets(counts[i], snap.bins, scale))
    for name in snap.names:
        if scalars:
            data.update({f"{prefix}.{k}/{name}": v for k, v in out[name].items() if math.isfinite(v)})
    if step_metric is None:
        run.log(data, step=step)
    else:
        run.log({**data, step_metric: step})
    return out
