"""Second-moment staleness: how far the gradients have moved from what an exponential
moving average of g² (the optimizer's ``v̂``) expects.

For one element at step ``t``, with ``g`` the gradient as it enters the second moment (after
unscaling and coupled weight decay) and ``v̂`` the bias-corrected second moment the update
divides by (with AMSGrad, the running maximum), the staleness is

    s = |g| / max(√v̂, ε).

Per tensor, the RMS staleness ``sqrt(mean(s²))`` is the square root of the ratio StableAdamW
(Wortsman et al., 2023) monitors and clips on, ``RMS_t = sqrt(mean(g² / max(v̂, ε²)))``.

**The bound.** The moving average ``v_t = β2 v_{t-1} + (1 - β2) g²`` gives ``v_t ≥ (1 - β2) g²``, so
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
import statistics
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .bins import LogBins

__all__ = ["AlertEpisode", "RMSEstimate", "StalenessAlert", "rms_from_counts", "staleness_bound"]


def staleness_bound(beta2: float, step: int | float) -> float:
    """``B(β2, t) = sqrt((1 - β2^t) / (1 - β2))``, the largest staleness that moving average allows at step
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


@dataclass
class AlertEpisode:
    """One alert: the step it fired at, the step it ended at (None while it lasts), the
    statistic and its baseline when it fired, its peak ratio, and the tensors that were
    stalest when it fired."""

    start: int
    value: float
    baseline: float
    peak: float
    tensors: list[str] = field(default_factory=list)
    end: int | None = None


class StalenessAlert:
    r"""Warns, once per episode, when the gradients jump past what ``v̂`` expects.

    The statistic of a step is the median over tensors of their RMS staleness (the median,
    not the maximum: LayerNorm weights and biases cross StableAdamW's RMS > 1 all the time in
    healthy runs, one at a time). It is compared with its own recent history, not with a
    fixed number: the alert fires at the first step where

        median_tensors(RMS_t) >= ratio * median(statistic over the previous ``window`` steps)

    holds ``patience`` steps in a row, and the episode ends after ``cooldown`` steps in a row
    below it. The history holds only steps below the threshold outside episodes (a spike
    must not become the new normal), and nothing fires before ``window`` steps have been
    seen. Being a ratio of
    staleness to staleness, the rule reads the same under any β2, although the bound
    ``B(β2, t)`` (:func:`staleness_bound`) on the staleness itself differs: 31.6 at
    β2 = 0.999 and 4.47 at 0.95.

    Feed it with :meth:`update` at every step you log (a host read of one small vector per
    call; nothing else syncs). :attr:`episodes` keeps every episode, the current one last.
    """

    def __init__(
        self, *, ratio: float = 3.0, window: int = 50, patience: int = 1, cooldown: int = 10, warn: bool = True
    ) -> None:
        if not ratio > 1.0:
            raise ValueError(f"Invalid ratio: {ratio}; the alert compares a step with its history, so it must be > 1")
        for name, value in (("window", window), ("patience", patience), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value}")
        self.ratio, self.window, self.patience, self.cooldown, self.warn = ratio, window, patience, cooldown, warn
        self.episodes: list[AlertEpisode] = []
        self._history: deque[float] = deque(maxlen=window)
        self._above = 0  # consecutive steps at or above the threshold
        self._below = 0  # consecutive steps below it, within an episode

    @property
    def active(self) -> bool:
        """Whether an episode is going on."""
        return bool(self.episodes) and self.episodes[-1].end is None

    def update(self, step: int, rms: Mapping[str, float] | Sequence[float] | Tensor) -> AlertEpisode | None:
        """Take step ``step``'s per-tensor RMS staleness (a name -> value mapping, or values);
        returns the episode when one starts at this step, else None. NaN values (tensors
        with nothing counted) are left out; a step with none left is skipped."""
        names, values = _named_values(rms)
        kept = [(v, n) for v, n in zip(values, names, strict=True) if not math.isnan(v)]
        if not kept:
            return None
        stat = statistics.median(v for v, _ in kept)
        if len(self._history) < self.window:
            self._history.append(stat)
            return None
        baseline = self._baseline
        high = stat >= self.ratio * baseline
        if self.active:
            return self._continue(step, stat, baseline, high)
        if not high:  # a high step that has not fired yet (patience) must not raise the baseline
            self._history.append(stat)
        self._above = self._above + 1 if high else 0
        if self._above < self.patience:
            return None
        stalest = [n for _, n in sorted(kept, reverse=True)[:3]]
        episode = AlertEpisode(step, stat, baseline, stat / baseline, stalest)
        self.episodes.append(episode)
        if self.warn:
            warnings.warn(
                f"fasthist: at step {step} the gradients jumped past what the second moment expects: "
                f"median RMS staleness {stat:.3g}, {stat / baseline:.2g}x its median over the last "
                f"{self.window} steps ({baseline:.3g}); stalest: {', '.join(stalest)}",
                RuntimeWarning,
                stacklevel=2,
            )
        return episode

    @property
    def _baseline(self) -> float:
        return max(statistics.median(self._history), 1e-30)

    def _continue(self, step: int, stat: float, baseline: float, high: bool) -> None:
        episode = self.episodes[-1]
        episode.peak = max(episode.peak, stat / baseline)
        self._below = 0 if high else self._below + 1
        if self._below >= self.cooldown:
            episode.end = step
            self._above = self._below = 0
        return None


def _named_values(rms: Mapping[str, float] | Sequence[float] | Tensor) -> tuple[list[str], list[float]]:
    if isinstance(rms, Mapping):
        return [str(k) for k in rms], [float(v) for v in rms.values()]
    values = rms.detach().reshape(-1).tolist() if isinstance(rms, Tensor) else [float(v) for v in rms]
    return [str(i) for i in range(len(values))], values
