"""Second-moment staleness: how far the gradients have moved from what Adam's ``v̂`` expects.

For one element at step ``t``, with ``g`` the gradient as it enters the second moment (after
unscaling and coupled weight decay) and ``v̂`` the bias-corrected second moment the update
divides by (with AMSGrad, the running maximum), the staleness is

    s = |g| / max(√v̂, ε).

Per tensor, the RMS staleness ``sqrt(mean(s²))`` is the square root of the ratio StableAdamW
(Wortsman et al., 2023) monitors and clips on, ``RMS_t = sqrt(mean(g² / max(v̂, ε²)))``.

**The bound.** Adam's ``v_t = β2 v_{t-1} + (1 - β2) g²`` gives ``v_t ≥ (1 - β2) g²``, so
``v̂_t = v_t / (1 - β2^t) ≥ g² (1 - β2) / (1 - β2^t)`` and every element, hence the RMS, obeys

    s ≤ B(β2, t) = sqrt((1 - β2^t) / (1 - β2))

(31.6 for β2 = 0.999 at large t, 4.47 for 0.95, 1 at t = 1). The same number means different
things under different β2: :func:`staleness_bound` gives B, and the alert rule compares
staleness with it.

**From a histogram.** :func:`rms_from_counts` reads the RMS off a LogBins histogram of ``s``
without the elements: each element of a log bin ``[lo, hi)`` has ``lo² ≤ s² < hi²``, so the
RMS lies in ``[L, U]`` with ``L² = Σ c lo² / n`` and ``U² = Σ c hi² / n``; exact zeros count 0.
With ``2^m`` bins per binade, ``hi / lo ≤ 1 + 2^-m`` in every log bin, so ``U / L ≤ 1 + 2^-m``
and the estimate ``sqrt(L U)`` is within a relative ``sqrt(1 + 2^-m) - 1 < 2^-(m+1)`` of the
true RMS (1.55% at the default ``m = 5``) whenever the below-range, above-range and
non-finite bins are empty. Elements below range (``0 < s < low``) add at most ``low²`` each
to ``U²`` (``L`` counts them as 0); an element above range makes ``U`` infinite and a
non-finite one makes the estimate NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .bins import LogBins

__all__ = ["RMSEstimate", "rms_from_counts", "staleness_bound"]


def staleness_bound(beta2: float, step: int | float) -> float:
    """``B(β2, t) = sqrt((1 - β2^t) / (1 - β2))``, the largest staleness Adam allows at step
    ``t`` (module docstring); 1 for ``t = 1``. ``β2 = 0`` gives 1 at every step."""
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta2: {beta2}")
    if step < 1:
        raise ValueError(f"Invalid step: {step}; the bound holds from the first step on")
    return math.sqrt(-math.expm1(step * math.log(beta2)) / (1.0 - beta2)) if beta2 > 0 else 1.0


class RMSEstimate(NamedTuple):
    """The RMS of the values a histogram row counted: ``estimate = sqrt(lower * upper)``,
    and ``lower <= RMS <= upper`` (float64, one value per row; NaN for an empty row)."""

    estimate: Tensor
    lower: Tensor
    upper: Tensor


def _square_edges(bins: LogBins, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per bin, the smallest and (exclusive) largest square of a value it holds."""
    edges = bins.edges.to(device)
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    inf = torch.full((1,), math.inf, dtype=torch.float64, device=device)
    nan = torch.full((1,), math.nan, dtype=torch.float64, device=device)
    low = torch.full((1,), bins.low, dtype=torch.float64, device=device)
    lo = torch.cat([zero, zero, edges[:-1], edges[-1:], nan])
    hi = torch.cat([zero, low, edges[1:], inf, nan])
    return lo.square(), hi.square()


def rms_from_counts(counts: Tensor, bins: LogBins) -> RMSEstimate:
    """The RMS of the values counted in ``counts`` (``[..., bins.num_bins]``, any integer
    dtype) with its bounds, per row, on the counts' device and with no host sync. The
    guarantee is in the module docstring: relative error below ``2^-(m+1)`` with the range
    bins empty."""
    if counts.shape[-1] != bins.num_bins:
        raise ValueError(f"Invalid counts: last dimension {counts.shape[-1]}, expected {bins.num_bins} for {bins}")
    if counts.is_floating_point() or counts.is_complex():
        raise TypeError(f"rms_from_counts(): expected integer counts, got {counts.dtype}")
    lo2, hi2 = _square_edges(bins, counts.device)
    c = counts.to(torch.float64)
    n = c.sum(-1)
    # 0 * inf and 0 * nan are nan: an empty range or non-finite bin must add nothing
    lower = (c * lo2.nan_to_num(nan=0.0)).sum(-1)
    upper = (c[..., :-2] * hi2[:-2]).sum(-1) + torch.where(c[..., -2] > 0, math.inf, 0.0)
    bad = c[..., -1] > 0
    lower = torch.where(bad, math.nan, lower / n).sqrt()
    upper = torch.where(bad, math.nan, upper / n).sqrt()
    return RMSEstimate((lower * upper).sqrt(), lower, upper)
