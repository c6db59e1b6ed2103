"""Histograms over :class:`~fasthist.LogBins`: storage (int64 counts) and queries.

Quantile rule (one for every query of the library): for ``n`` counted elements sorted
ascending as ``a[0] <= ... <= a[n-1]``, ``quantile(q)`` estimates the order statistic
``a[min(floor(q * n), n - 1)]`` (no interpolation): the smallest value at which the
empirical distribution function exceeds ``q``. It is the sorted-index rule the ε-range
rule of Silva & Rodriguez is defined with (``a[floor(0.02*n)]``, ``a[floor(0.98*n)]``), so
``opt.quantiles``, ``Histogram.quantile``, the percentiles every integration logs and the
bounds of ``eps_range`` are the same numbers. It returns the representative value of the
bin holding that order statistic, so whenever ``low <= a[k] < high`` the result ``r``
satisfies ``|r - a[k]| <= relative_accuracy * a[k]``. Outside the range it returns: ``0.0``
for an exact zero, ``low`` for ``0 < a[k] < low``, ``high`` for ``a[k] >= high`` (finite),
NaN for a non-finite ``a[k]``, and NaN for an empty histogram.

The rank is computed in integers: ``q * n`` rounded once to float64 (what float64
arithmetic gives whenever ``n <= 2**53``), then floored, never past ``n - 1``, for any
``n`` up to ``2**63 - 1``. Counts are nonnegative and their total fits int64:
:class:`Histogram` checks both, and a merge that would overflow is refused.

Share above ε (:func:`batched_fraction_above`, one rule for every query, integration and
figure): each element is taken at its bin's representative; see that function for what
this makes exact.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import overload

import numpy as np
import torch
from torch import Tensor

from .bins import LogBins

__all__ = [
    "Histogram",
    "as_quantiles",
    "batched_quantile",
    "batched_count_above",
    "batched_fraction_above",
    "int_arg",
    "invalid_rows",
    "real_scalar",
]


def _is_bool(x: object) -> bool:
    return isinstance(x, (bool, np.bool_)) or (
        isinstance(x, (Tensor, np.ndarray)) and x.dtype in (torch.bool, np.bool_)
    )


def int_arg(x: object, what: str, minimum: int, *, allow_none: bool = False) -> int | None:
    """``x`` if it is an int (Python or NumPy, not a bool: ``True`` is no count) of at
    least ``minimum``, or None where ``allow_none``; else ``ValueError(f"Invalid {what}:
    ...")`` saying what is allowed."""
    if x is None and allow_none:
        return None
    if _is_bool(x) or not isinstance(x, numbers.Integral) or x < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"Invalid {what}: {x!r}; expected {allowed}")
    return int(x)


def real_scalar(x: object, what: str) -> float:
    """``x`` as a float if it is a real number (Python or NumPy, not a bool, not NaN);
    ``what`` names the argument in the error, e.g. ``"fraction_above() x"``."""
    if _is_bool(x) or not isinstance(x, numbers.Real):
        raise TypeError(f"{what} must be a real number, but got {type(x).__name__}")
    value = float(x)
    if math.isnan(value):
        raise ValueError(f"{what} must not be NaN")
    return value


def as_quantiles(q: float | Sequence[float] | Tensor) -> tuple[Tensor, bool]:
    """``q`` as a float64 CPU vector, checked to lie in [0, 1], and whether it was a scalar.

    One rule: a real number (Python or NumPy: ``0.5``, ``1``, ``np.float32(0.5)``) is a
    scalar; a sequence, array or tensor (of any shape, flattened) is a vector. Bools are
    refused, alone or inside."""
    if _is_bool(q) or (isinstance(q, (list, tuple)) and any(_is_bool(x) for x in q)):
        raise TypeError("quantile() q must be a real number or a sequence of them, but got bool")
    scalar = isinstance(q, numbers.Real)
    qt = torch.as_tensor(q, dtype=torch.float64).reshape(-1).cpu()
    if qt.numel() == 0 or not bool(((qt >= 0) & (qt <= 1)).all()):
        raise ValueError(f"quantile() q values must be in the range [0, 1], but got {q}")
    return qt, scalar


_LIMB = 21  # bits per limb: a product of two limbs, times three, fits int64
_LIMB_MASK = (1 << _LIMB) - 1
_NUM_LIMBS = 6  # of a product below 2**126


def _limbs(x: Tensor) -> list[Tensor]:
    """Three 21-bit limbs, least significant first, of nonnegative int64 values below 2**63."""
    return [(x >> (_LIMB * i)) & _LIMB_MASK for i in range(3)]


def _shifted(limbs: list[Tensor], x: Tensor) -> Tensor:
    """``P >> x`` of the number ``P`` the limbs hold (the limbs hold disjoint bits, so
    each lands where it belongs); the result must be below 2**63."""
    out = torch.zeros_like(limbs[0])
    for k, limb in enumerate(limbs):
        d = _LIMB * k - x
        out += (limb >> (-d).clamp(0, 62)) << d.clamp(0, 62)
    return out


def _any_below(limbs: list[Tensor], x: Tensor) -> Tensor:
    """Whether ``P mod 2**x`` is nonzero."""
    out = torch.zeros_like(limbs[0], dtype=torch.bool)
    for k, limb in enumerate(limbs):
        keep = (x - _LIMB * k).clamp(0, _LIMB)
        out |= (limb & ((1 << keep) - 1)) != 0
    return out


def _floor_mul(m: Tensor, q: Tensor) -> Tensor:
    """``min(floor(q ⊗ m), m)`` for int64 ``m`` in [0, 2**63) ([R]) and float64 ``q`` in
    [0, 1] ([Q], on the host), where ``⊗`` is the float64 product rounded once to nearest
    (ties to even): int64 [R, Q], computed exactly in integers.

    For ``m <= 2**53`` that is float64 arithmetic's ``floor(q * m)`` (numpy's and torch's
    convention), bit for bit; beyond, ``m`` itself is not rounded first. ``q = num / 2**s``
    (``num < 2**53``, ``s <= 115`` once ``q >= 2**-63``; smaller ``q`` give 0 for every
    ``m``). ``P = num * m < 2**116`` is formed in 21-bit limbs and rounded to 53
    significant bits before the shift by ``s``."""
    nums, shifts = [], []
    for x in q.tolist():
        num, den = x.as_integer_ratio() if x >= 2.0**-63 else (0, 1)
        nums.append(num)
        shifts.append(den.bit_length() - 1)
    device = m.device
    a = _limbs(torch.tensor(nums, dtype=torch.int64, device=device))  # [Q] each
    b = _limbs(m.unsqueeze(-1))  # [R, 1] each
    s = torch.tensor(shifts, dtype=torch.int64, device=device)
    zero = torch.zeros(m.shape[0], len(nums), dtype=torch.int64, device=device)
    limbs, carry = [], zero
    for k in range(_NUM_LIMBS):
        column = carry + sum((a[i] * b[k - i] for i in range(max(0, k - 2), min(k, 2) + 1)), zero)
        limbs.append(column & _LIMB_MASK)
        carry = column >> _LIMB
    # bit length of P, from its top nonzero limb (frexp is exact below 2**53)
    length = zero.clone()
    for k, limb in enumerate(limbs):
        length = torch.where(limb != 0, _LIMB * k + torch.frexp(limb.double()).exponent.long(), length)
    t = (length - 53).clamp(min=0)  # low bits of P that float64 cannot keep
    top = _shifted(limbs, t)  # P rounded down to 53 significant bits, shifted by t
    half = _shifted(limbs, (t - 1).clamp(min=0)) & 1
    up = (t > 0) & (half == 1) & (_any_below(limbs, (t - 1).clamp(min=0)) | ((top & 1) == 1))
    d = t - s  # floor(RN(P) / 2**s) = floor((top + up) * 2**d)
    mm = m.unsqueeze(-1)
    down = (top >> (-d).clamp(0, 62)) << d.clamp(0, 62)  # <= P / 2**s <= m: no overflow
    step = torch.ones_like(d) << d.clamp(0, 62)  # what rounding up adds where d >= 0
    raised = torch.where(d >= 0, torch.minimum(down, mm - step) + step, (top + 1) >> (-d).clamp(0, 62))
    return torch.minimum(torch.where(up, raised, down), mm)


def _ranks(n: Tensor, q: Tensor) -> Tensor:
    """Order-statistic index ``min(floor(q*n), n-1)`` per (row, q), in integers (see
    :func:`_floor_mul`); 0 for an empty row."""
    return torch.minimum(_floor_mul(n, q), (n - 1).unsqueeze(-1)).clamp_(min=0)


def _require_values(counts: Tensor) -> None:
    """Refuse counts on the meta device: they have a shape but no values to query."""
    if counts.device.type == "meta":
        raise RuntimeError(
            "histogram counts are on the meta device, which holds shapes but no values: the parameters were "
            "meta tensors when they were stepped, so nothing was counted; materialise the model first "
            "(module.to_empty(device=...) and initialise it), then build the optimizer and step"
        )


def invalid_rows(counts: Tensor) -> Tensor:
    """bool ``[R]`` for ``counts`` ``[R, num_bins]``: rows that are not counts, with a
    negative bin or a total that does not fit int64 (its running sum wrapped: with
    nonnegative bins, the first wrap makes the running sum negative). Counts on the meta
    device are refused (``RuntimeError``): every query checks its rows here first."""
    _require_values(counts)
    return (counts < 0).any(dim=-1) | (counts.cumsum(dim=-1) < 0).any(dim=-1)


def _without_zeros(counts: Tensor, bins: LogBins, exclude_zeros: bool) -> Tensor:
    if not exclude_zeros:
        return counts
    counts = counts.clone()
    counts[:, bins.ZERO] = 0
    return counts


def batched_quantile(
    counts: Tensor,
    q: Tensor,
    bins: LogBins,
    *,
    exclude_zeros: bool = False,
) -> Tensor:
    """Quantiles of every row of ``counts`` ([R, num_bins]) at every ``q`` ([Q]) as one
    device operation: float64 [R, Q], NaN for empty rows. The one rank rule,
    ``a[min(floor(q*n), n-1)]``: see the module docstring."""
    _require_values(counts)
    counts = _without_zeros(counts, bins, exclude_zeros)
    cum = counts.cumsum(dim=1)
    n = cum[:, -1]
    k = _ranks(n, q)
    idx = torch.searchsorted(cum, k, right=True).clamp_(max=bins.num_bins - 1)
    values = bins.representatives_on(counts.device)[idx]
    return values.masked_fill_((n == 0).unsqueeze(-1), float("nan"))


def batched_fraction_above(
    counts: Tensor, eps: float | Tensor, bins: LogBins, *, exclude_zeros: bool = False
) -> Tensor:
    r"""Share of each row's elements above ε: ``counts`` [R, num_bins], ``eps`` a number
    (every row), a tensor [R] (one ε per row: float64 [R] out) or [R, K] (K thresholds
    per row: float64 [R, K] out). The one "share above ε" of the library.

    Rule: an element counts as above iff its bin's representative ``r`` exceeds ε (``r``
    is 0 for an exact zero, ``low`` below range, the bin's value inside, ``high`` above
    range, NaN for non-finite values, which are never above). Against the raw values
    ``a``, with ``ρ = bins.relative_accuracy``:

    - inside ``[low, high)`` only the bin that holds ε can disagree, counted whole on the
      side of its representative, so every element counted wrongly lies in
      ``[ε/(1+ρ), ε/(1-ρ)]``; when ε is a bin edge the share is exactly that of the
      elements ``>= ε`` (elements equal to ε count as above);
    - out of range the bins count as their bounds: for ``ε < low`` every below-range
      element is above, for ``ε >= high`` no above-range element is;
    - exact zeros are above only for ``ε < 0``; ``exclude_zeros`` drops them from the
      row first (numerator and denominator).

    NaN for an empty row and for a NaN ε. The denominator is every element counted
    (non-finite ones included): the share is ``above / n`` of :func:`batched_count_above`.
    """
    above, n, nan_eps, per_row = _count_above(counts, eps, bins, exclude_zeros)
    share = (above.to(torch.float64) / n.to(torch.float64)).masked_fill_(nan_eps, float("nan"))
    return share[:, 0] if per_row else share


def batched_count_above(
    counts: Tensor, eps: float | Tensor, bins: LogBins, *, exclude_zeros: bool = False
) -> tuple[Tensor, Tensor]:
    """``(above, n)``, int64: per row the number of elements above ε by the rule of
    :func:`batched_fraction_above` (0 for a NaN ε), shaped as its result, and the row's
    element count ``[R]``. Shares over several rows, each with its own ε, are exact
    from these: ``above.sum() / n.sum()``."""
    above, n, _, per_row = _count_above(counts, eps, bins, exclude_zeros)
    return (above[:, 0] if per_row else above), n[:, 0]


def _count_above(
    counts: Tensor, eps: float | Tensor, bins: LogBins, exclude_zeros: bool
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``(above [R, K], n [R, 1], NaN ε [R, K], one ε per row)``: one cumulative sum per row
    and a binary search per ε, the representatives increasing with the bin index (zero,
    below, log bins, above)."""
    _require_values(counts)
    counts = _without_zeros(counts, bins, exclude_zeros)
    device = counts.device
    e = torch.as_tensor(eps, dtype=torch.float64, device=device)
    per_row = e.ndim < 2
    e = e.reshape(-1, 1) if e.ndim == 1 else e.reshape(1, 1) if e.ndim == 0 else e
    e = e.expand(counts.shape[0], e.shape[1]).contiguous()
    finite = bins.nonfinite  # bins [0, nonfinite) hold finite values, representatives increasing
    cum = torch.nn.functional.pad(counts[:, :finite].cumsum(dim=1), (1, 0))  # [R, finite + 1]
    first_above = torch.searchsorted(bins.representatives_on(device)[:finite], e, right=True)
    above = cum[:, -1:] - cum.gather(1, first_above)
    return above, counts.sum(dim=1, keepdim=True), e.isnan(), per_row


class Histogram:
    r"""Counts of values over a :class:`LogBins` layout: a mergeable quantile sketch.

    Args:
        counts (Tensor): int64 counts, shape ``[bins.num_bins]``, on any device: nonnegative,
            with a total below ``2**63``.
        bins (LogBins): the layout the counts were recorded with.
        validate (bool): check that the counts are nonnegative and their total fits int64
            (default: True; it reads the device). False for counts already checked.

    ``h1 + h2`` merges two histograms (the histogram of the concatenated values); both
    must have equal bins, and a merge whose total would overflow int64 is refused. Quantiles carry the guarantee of the module docstring:
    relative error at most :attr:`relative_accuracy` inside ``[bins.low, bins.high)``.
    """

    __slots__ = ("counts", "bins")

    def __init__(self, counts: Tensor, bins: LogBins, *, validate: bool = True) -> None:
        if not isinstance(bins, LogBins):
            raise TypeError(f"bins must be a fasthist.LogBins, but got {type(bins).__name__}")
        if not isinstance(counts, Tensor) or counts.dtype != torch.int64 or counts.shape != (bins.num_bins,):
            got = (
                f"a {str(counts.dtype).removeprefix('torch.')} tensor of shape {tuple(counts.shape)}"
                if isinstance(counts, Tensor)
                else f"a {type(counts).__name__}"
            )
            raise ValueError(f"Histogram counts must be an int64 tensor of shape ({bins.num_bins},), but got {got}")
        if validate and bool(invalid_rows(counts.unsqueeze(0))[0]):
            negative = (counts < 0).nonzero()
            if negative.numel():
                i = int(negative[0, 0])
                raise ValueError(f"Histogram counts must be nonnegative, but bin {i} holds {int(counts[i])}")
            raise ValueError("Histogram counts must sum to less than 2**63 (int64), but their sum overflows")
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
        """Approximate ``a[min(floor(q*n), n-1)]`` of the sorted values (see module docstring).

        Returns a float for a scalar ``q`` (a Python or NumPy real number), else a float64
        CPU tensor of ``len(q)`` values (for a sequence, array or tensor). Bools are refused.
        ``exclude_zeros=True`` drops the exact-zero bin first (dead units, unused rows).
        """
        qt, scalar = as_quantiles(q)
        out = batched_quantile(self.counts.unsqueeze(0), qt, self.bins, exclude_zeros=exclude_zeros)[0].cpu()
        return float(out[0]) if scalar else out

    def fraction_above(self, x: float, *, exclude_zeros: bool = False) -> float:
        """Share of elements above ``x``, each element taken at its bin's representative:
        the rule of :func:`batched_fraction_above`, whose docstring states what is exact
        (every element but those of the bin holding ``x``, which lie within
        ``relative_accuracy`` of it; all of them at a bin edge) and how the out-of-range
        bins count. Non-finite values are never above; an empty histogram gives NaN.
        ``x`` is a real number, not NaN.
        """
        x = real_scalar(x, "fraction_above() x")
        return float(batched_fraction_above(self.counts.unsqueeze(0), x, self.bins, exclude_zeros=exclude_zeros)[0])

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` of the log bins, as ``numpy.histogram`` returns them.

        Zero, below-range, above-range and non-finite counts are not in ``counts``; read
        them from :attr:`zero_count` and friends.
        """
        c = self.counts.detach().cpu().numpy()
        return c[self.bins.FIRST_LOG : self.bins.above].copy(), self.bins.edges.numpy()

    def to(self, device: torch.device | str) -> Histogram:
        return Histogram(self.counts.to(device), self.bins, validate=False)

    def __add__(self, other: Histogram) -> Histogram:
        if not isinstance(other, Histogram):
            return NotImplemented
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms with different bins: {self.bins} and {other.bins}")
        counts = self.counts + other.counts.to(self.counts.device)
        if bool(invalid_rows(counts.unsqueeze(0))[0]):  # both sides are valid: it wrapped
            raise ValueError(
                f"cannot merge histograms: the merged counts overflow int64 ({self.count} + {other.count} >= 2**63)"
            )
        return Histogram(counts, self.bins, validate=False)

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
