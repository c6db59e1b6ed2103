"""Histograms over :class:`~fasthist.LogBins`: storage (int64 counts) and queries.

Quantile rule: for ``n`` counted elements sorted ascending as ``a[0] <= ... <= a[n-1]``,
``quantile(q)`` estimates the order statistic ``a[floor(q * (n - 1))]`` (no
interpolation). It returns the representative value of the bin holding that order
statistic, so whenever ``low <= a[k] < high`` the result ``r`` satisfies
``|r - a[k]| <= relative_accuracy * a[k]``. Outside the range it returns: ``0.0`` for
an exact zero, ``low`` for ``0 < a[k] < low``, ``high`` for ``a[k] >= high`` (finite),
NaN for a non-finite ``a[k]``, and NaN for an empty histogram.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np
import torch
from torch import Tensor

from .bins import LogBins

__all__ = ["Histogram", "as_quantiles", "batched_quantile", "batched_fraction_above"]


def as_quantiles(q: float | Sequence[float] | Tensor) -> tuple[Tensor, bool]:
    """``q`` as a float64 CPU vector, checked to lie in [0, 1], and whether it was a scalar."""
    scalar = isinstance(q, (int, float)) and not isinstance(q, bool)
    qt = torch.as_tensor(q, dtype=torch.float64).reshape(-1).cpu()
    if qt.numel() == 0 or not bool(((qt >= 0) & (qt <= 1)).all()):
        raise ValueError(f"quantile() q values must be in the range [0, 1], but got {q}")
    return qt, scalar


def _ranks(n: Tensor, q: Tensor, rule: str) -> Tensor:
    """Order-statistic index per (row, q): ``floor(q*(n-1))`` ("n-1", this class's rule)
    or ``min(floor(q*n), n-1)`` ("n", the ε-range rule of the paper), in float64."""
    nf = n.to(torch.float64).unsqueeze(-1)
    q = q.to(n.device)
    if rule == "n-1":
        k = torch.floor(q * (nf - 1))
    elif rule == "n":
        k = torch.minimum(torch.floor(q * nf), nf - 1)
    else:
        raise ValueError(f"unknown rank rule {rule!r}")
    return k.clamp_(min=0).to(torch.int64)


def batched_quantile(
    counts: Tensor,
    q: Tensor,
    bins: LogBins,
    *,
    exclude_zeros: bool = False,
    rule: str = "n-1",
) -> Tensor:
    """Quantiles of every row of ``counts`` ([R, num_bins]) at every ``q`` ([Q]) as one
    device operation: float64 [R, Q], NaN for empty rows. See the module docstring."""
    if exclude_zeros:
        counts = counts.clone()
        counts[:, bins.ZERO] = 0
    cum = counts.cumsum(dim=1)
    n = cum[:, -1]
    k = _ranks(n, q, rule)
    idx = torch.searchsorted(cum, k, right=True).clamp_(max=bins.num_bins - 1)
    values = bins.representatives_on(counts.device)[idx]
    return values.masked_fill_((n == 0).unsqueeze(-1), float("nan"))


def batched_fraction_above(counts: Tensor, x: float, bins: LogBins, *, exclude_zeros: bool = False) -> Tensor:
    """Share of each row's elements whose bin representative exceeds ``x`` (float64 [R])."""
    if exclude_zeros:
        counts = counts.clone()
        counts[:, bins.ZERO] = 0
    above = bins.representatives_on(counts.device) > x  # NaN (non-finite bin) is never above
    n = counts.sum(dim=1)
    return (counts * above).sum(dim=1).to(torch.float64) / n.to(torch.float64)


class Histogram:
    r"""Counts of values over a :class:`LogBins` layout: a mergeable quantile sketch.

    Args:
        counts (Tensor): int64 counts, shape ``[bins.num_bins]``, on any device.
        bins (LogBins): the layout the counts were recorded with.

    ``h1 + h2`` merges two histograms (the histogram of the concatenated values); both
    must have equal bins. Quantiles carry the guarantee of the module docstring:
    relative error at most :attr:`relative_accuracy` inside ``[bins.low, bins.high)``.
    """

    __slots__ = ("counts", "bins")

    def __init__(self, counts: Tensor, bins: LogBins) -> None:
        if not isinstance(bins, LogBins):
            raise TypeError(f"bins must be a fasthist.LogBins, but got {type(bins).__name__}")
        if not isinstance(counts, Tensor) or counts.dtype != torch.int64 or counts.shape != (bins.num_bins,):
            shape = tuple(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__
            raise ValueError(f"Histogram counts must be an int64 tensor of shape ({bins.num_bins},), but got {shape}")
        self.counts = counts
        self.bins = bins

    @classmethod
    def from_values(cls, values: Tensor, bins: LogBins | None = None) -> Histogram:
        """Exact histogram of ``|values|`` (the reference every backend must match)."""
        bins = LogBins() if bins is None else bins
        return cls(bins.count(values), bins)

    @classmethod
    def empty(cls, bins: LogBins | None = None, device: torch.device | str = "cpu") -> Histogram:
        bins = LogBins() if bins is None else bins
        return cls(torch.zeros(bins.num_bins, dtype=torch.int64, device=device), bins)

    @property
    def count(self) -> int:
        """Number of elements counted (synchronises with the device)."""
        return int(self.counts.sum())

    @property
    def relative_accuracy(self) -> float:
        return self.bins.relative_accuracy

    @property
    def zero_count(self) -> int:
        return int(self.counts[self.bins.ZERO])

    @property
    def below_count(self) -> int:
        return int(self.counts[self.bins.BELOW])

    @property
    def above_count(self) -> int:
        return int(self.counts[self.bins.above])

    @property
    def nonfinite_count(self) -> int:
        return int(self.counts[self.bins.nonfinite])

    @property
    def edges(self) -> Tensor:
        """float64 edges of the log bins (``num_log_bins + 1`` values)."""
        return self.bins.edges

    @overload
    def quantile(self, q: float, *, exclude_zeros: bool = False) -> float: ...
    @overload
    def quantile(self, q: Sequence[float] | Tensor, *, exclude_zeros: bool = False) -> Tensor: ...
    def quantile(self, q, *, exclude_zeros: bool = False):
        """Approximate ``a[floor(q*(n-1))]`` of the sorted values (see module docstring).

        Returns a float for a scalar ``q``, else a float64 CPU tensor of ``len(q)`` values.
        ``exclude_zeros=True`` drops the exact-zero bin first (dead units, unused rows).
        """
        qt, scalar = as_quantiles(q)
        out = batched_quantile(self.counts.unsqueeze(0), qt, self.bins, exclude_zeros=exclude_zeros)[0].cpu()
        return float(out[0]) if scalar else out

    def fraction_above(self, x: float, *, exclude_zeros: bool = False) -> float:
        """Share of elements above ``x``, each element taken at its bin's representative.

        Inside ``[low, high)``: exact when ``x`` is a bin edge (except elements equal to
        ``x``, counted above); otherwise only elements within ``relative_accuracy`` of ``x``
        can be misclassified. Outside the range the below/above-range bins count as the
        range bound: for ``x < low`` every below-range element counts as above, for
        ``x >= high`` no above-range element does. Non-finite values are never above;
        an empty histogram gives NaN.
        """
        return float(
            batched_fraction_above(self.counts.unsqueeze(0), float(x), self.bins, exclude_zeros=exclude_zeros)[0]
        )

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` of the log bins, as ``numpy.histogram`` returns them.

        Zero, below-range, above-range and non-finite counts are not in ``counts``; read
        them from :attr:`zero_count` and friends.
        """
        c = self.counts.detach().cpu().numpy()
        return c[self.bins.FIRST_LOG : self.bins.above].copy(), self.bins.edges.numpy()

    def to(self, device: torch.device | str) -> Histogram:
        return Histogram(self.counts.to(device), self.bins)

    def __add__(self, other: Histogram) -> Histogram:
        if not isinstance(other, Histogram):
            return NotImplemented
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms with different bins: {self.bins} and {other.bins}")
        return Histogram(self.counts + other.counts.to(self.counts.device), self.bins)

    def __radd__(self, other: object) -> Histogram:
        if isinstance(other, int) and other == 0:  # so that sum(histograms) works
            return self
        return NotImplemented

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.bins == other.bins and torch.equal(self.counts.cpu(), other.counts.cpu())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, bins={self.bins})"
