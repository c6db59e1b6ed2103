"""Log-linear binning of float32 values by their bit pattern.

The layout (HdrHistogram-style, no ``log()`` anywhere)::

    index 0              exact zero (+0.0 and -0.0)
    index 1              below range: 0 < |x| < low          (subnormals included)
    index 2 .. 2+N-1     log bins covering [low, high)
    index 2+N            above range: high <= |x| < inf
    index 2+N+1          non-finite: +-inf and NaN

with ``low = 2**min_exponent``, ``high = 2**max_exponent`` and
``N = (max_exponent - min_exponent) * 2**mantissa_bits``. Every binade
``[2**e, 2**(e+1))`` is split into ``2**mantissa_bits`` equal-width bins, so the bin of
``x`` is read straight off the float32 bits: ``(bits(|x|) >> (23 - mantissa_bits))``
minus a constant. The indices are in the order of ``|x|`` (NaN sorts last, as in
``torch.sort``), every element lands in exactly one bin, and any backend that can shift
an int32 produces the same bins as any other.

Guarantee: a bin ``[lo, hi)`` of binade ``2**e`` has ``hi - lo = 2**(e - mantissa_bits)``.
Representing all its elements by ``r = 2*lo*hi / (lo + hi)`` gives a relative error
``|r - x| / x <= (hi - lo) / (hi + lo) <= 1 / (2**(mantissa_bits + 1) + 1)`` for every
``x`` in the bin; that bound is :attr:`LogBins.relative_accuracy` (1.54% by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["LogBins"]

_FLOAT32_MIN_EXPONENT = -126  # smallest normal binade of float32
_FLOAT32_MAX_EXPONENT = 128  # 2**128 is the first value past float32's largest finite
_MAX_MANTISSA_BITS = 10  # 1024 bins per binade; finer buys nothing a sketch needs
_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_ABS_MASK64 = 0x7FFFFFFFFFFFFFFF
_INF_BITS64 = 0x7FF0000000000000


@dataclass(frozen=True)
class LogBins:
    r"""Binning spec of a log-linear histogram of float32 magnitudes.

    Args:
        min_exponent (int): the range starts at ``low = 2**min_exponent`` (default: -67,
            i.e. 6.8e-21, so the range covers 1e-20).
        max_exponent (int): the range ends at ``high = 2**max_exponent``, exclusive
            (default: 14, i.e. 16384, so the range covers 1e4).
        mantissa_bits (int): each binade is split into ``2**mantissa_bits`` bins
            (default: 5). Relative accuracy is ``1 / (2**(mantissa_bits+1) + 1)``:
            3.0% for 4, 1.54% for 5, 0.78% for 6, 0.39% for 7.

    The value is frozen and hashable; two histograms can be merged only when their
    ``LogBins`` are equal. See the module docstring for the index layout and the proof of
    the guarantee. Use :meth:`from_range` to pick the bins from a value range and an
    accuracy target.
    """

    min_exponent: int = -67
    max_exponent: int = 14
    mantissa_bits: int = 5

    def __post_init__(self) -> None:
        for name in ("min_exponent", "max_exponent", "mantissa_bits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"LogBins {name} must be an int, but got {type(value).__name__}")
        if not _FLOAT32_MIN_EXPONENT <= self.min_exponent < self.max_exponent <= _FLOAT32_MAX_EXPONENT:
            raise ValueError(
                f"Invalid LogBins exponent range: [{self.min_exponent}, {self.max_exponent}); "
                f"need {_FLOAT32_MIN_EXPONENT} <= min_exponent < max_exponent <= {_FLOAT32_MAX_EXPONENT}"
            )
        if not 0 <= self.mantissa_bits <= _MAX_MANTISSA_BITS:
            raise ValueError(
                f"Invalid LogBins mantissa_bits: {self.mantissa_bits}; need 0 <= mantissa_bits <= {_MAX_MANTISSA_BITS}"
            )

    @classmethod
    def from_range(cls, min_value: float = 1e-20, max_value: float = 1e4, relative_accuracy: float = 0.02) -> LogBins:
        """The coarsest bins covering ``[min_value, max_value]`` with at least the given accuracy."""
        if not 0.0 < min_value < max_value < math.inf:
            raise ValueError(f"Invalid LogBins range: [{min_value}, {max_value}]; need 0 < min_value < max_value < inf")
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"Invalid relative_accuracy: {relative_accuracy}; need 0 < relative_accuracy < 1")
        min_exponent = math.frexp(min_value)[1] - 1  # 2**min_exponent <= min_value
        max_exponent = math.frexp(max_value)[1]  # 2**max_exponent > max_value
        if min_exponent < _FLOAT32_MIN_EXPONENT or max_exponent > _FLOAT32_MAX_EXPONENT:
            raise ValueError(
                f"Invalid LogBins range: [{min_value}, {max_value}]; log bins cover float32's normal range "
                f"[2**{_FLOAT32_MIN_EXPONENT}, 2**{_FLOAT32_MAX_EXPONENT})"
            )
        bits = 0
        while 1.0 / (2 ** (bits + 1) + 1) > relative_accuracy:
            bits += 1
        if bits > _MAX_MANTISSA_BITS:
            finest = 1.0 / (2 ** (_MAX_MANTISSA_BITS + 1) + 1)
            raise ValueError(f"Invalid relative_accuracy: {relative_accuracy}; the finest LogBins give {finest:.3g}")
        return cls(min_exponent, max_exponent, bits)

    # Layout -----------------------------------------------------------------------------
    @property
    def shift(self) -> int:
        """Right shift of the float32 bits that leaves exponent and top mantissa bits."""
        return 23 - self.mantissa_bits

    @property
    def num_log_bins(self) -> int:
        return (self.max_exponent - self.min_exponent) << self.mantissa_bits

    @property
    def num_bins(self) -> int:
        """All bins: zero, below, the log bins, above, non-finite."""
        return self.num_log_bins + 4

    ZERO: ClassVar[int] = 0
    BELOW: ClassVar[int] = 1
    FIRST_LOG: ClassVar[int] = 2

    @property
    def above(self) -> int:
        return 2 + self.num_log_bins

    @property
    def nonfinite(self) -> int:
        return 3 + self.num_log_bins

    @property
    def low(self) -> float:
        return math.ldexp(1.0, self.min_exponent)

    @property
    def high(self) -> float:
        return math.ldexp(1.0, self.max_exponent)

    @property
    def relative_accuracy(self) -> float:
        """Worst-case relative error of a bin's representative value, inside the range."""
        return 1.0 / (2 ** (self.mantissa_bits + 1) + 1)

    @property
    def low_key(self) -> int:
        """``bits(low) >> shift``: the shifted key of the first log bin."""
        return ((self.min_exponent + 127) << 23) >> self.shift

    @property
    def spec(self) -> tuple[int, int, int]:
        """Plain-int form, safe inside a ``torch.load(weights_only=True)`` checkpoint."""
        return (self.min_exponent, self.max_exponent, self.mantissa_bits)

    @cached_property
    def _edges(self) -> Tensor:
        n = 1 << self.mantissa_bits
        j = torch.arange(self.num_log_bins + 1, dtype=torch.float64)
        e = torch.div(j, n, rounding_mode="floor")
        return torch.ldexp(1.0 + (j - e * n) / n, e + self.min_exponent)

    @property
    def edges(self) -> Tensor:
        """float64 edges of the log bins, length ``num_log_bins + 1``, from low to high."""
        return self._edges.clone()

    @cached_property
    def _representatives(self) -> Tensor:
        lo, hi = self._edges[:-1], self._edges[1:]
        mid = 2.0 * lo * hi / (lo + hi)
        head = torch.tensor([0.0, self.low], dtype=torch.float64)
        tail = torch.tensor([self.high, math.nan], dtype=torch.float64)
        return torch.cat([head, mid, tail])

    @property
    def representatives(self) -> Tensor:
        """float64 value reported for each bin: 0 for zero, ``low`` for below range,
        ``2*lo*hi/(lo+hi)`` for a log bin, ``high`` for above range, NaN for non-finite."""
        return self._representatives.clone()

    def representatives_on(self, device: torch.device | str) -> Tensor:
        """:attr:`representatives` on ``device``, copied there once (do not modify)."""
        cache = self.__dict__.setdefault("_reps", {})
        key = str(device)
        if key not in cache:
            cache[key] = self._representatives.to(device)
        return cache[key]

    @cached_property
    def _key_table(self) -> Tensor:
        # Bin of every shifted key ``bits(|x|) >> shift`` (2**(8 + mantissa_bits) keys).
        # Key 0 is shared by +0 and subnormals below 2**(shift - 149); it maps to BELOW
        # here, and callers either split it off or know it can only hold zeros.
        keys = torch.arange(1 << (31 - self.shift), dtype=torch.int64)
        idx = (keys - self.low_key + self.FIRST_LOG).clamp_(self.BELOW, self.above)
        idx[keys >= (_INF_BITS >> self.shift)] = self.nonfinite
        return idx.to(torch.int32)

    def key_table_on(self, device: torch.device | str, *, key0_is_zero: bool = False) -> Tensor:
        """int32 table from shifted key to bin. ``key0_is_zero=True`` maps key 0 to the
        zero bin: right when no value can be a subnormal below ``2**(shift - 149)``."""
        cache = self.__dict__.setdefault("_tables", {})
        k = (str(device), key0_is_zero)
        if k not in cache:
            table = self._key_table.clone()
            if key0_is_zero:
                table[0] = self.ZERO
            cache[k] = table.to(device)
        return cache[k]

    # Binning ----------------------------------------------------------------------------
    def index(self, x: Tensor) -> Tensor:
        """Bin index (int64) of every element of ``|x|``.

        float32 is binned by its bits, bf16/fp16 by the bits of their exact float32 value,
        float64 by its own bits (the same layout: ``bits >> (52 - mantissa_bits)`` minus a
        constant), never rounded to float32 first: a nonzero float64 never lands in the
        zero bin, a finite one never in the non-finite bin, and no rounding moves a value
        across a bin edge.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"LogBins.index expects a Tensor, but got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"LogBins.index expects a floating point tensor, but got {x.dtype}")
        if x.dtype == torch.float64:
            bits = x.detach().contiguous().view(torch.int64) & _ABS_MASK64
            key = bits >> (52 - self.mantissa_bits)
            low_key = ((self.min_exponent + 1023) << 52) >> (52 - self.mantissa_bits)
            inf_bits = _INF_BITS64
        else:
            bits = (x.detach().to(torch.float32).contiguous().view(torch.int32) & _ABS_MASK).long()
            key = bits >> self.shift
            low_key = self.low_key
            inf_bits = _INF_BITS
        idx = (key - low_key + self.FIRST_LOG).clamp_(self.BELOW, self.above)
        idx = torch.where(bits >= inf_bits, self.nonfinite, idx)
        return torch.where(bits == 0, self.ZERO, idx)

    def count(self, x: Tensor) -> Tensor:
        """Histogram (int64 counts, length ``num_bins``) of all elements of ``x``."""
        return torch.bincount(self.index(x).reshape(-1), minlength=self.num_bins)

    def __reduce__(self):
        # the per-device caches in __dict__ (tables, representatives) are not part of the value
        return (LogBins, self.spec)

    def __repr__(self) -> str:
        return (
            f"LogBins(min_exponent={self.min_exponent}, max_exponent={self.max_exponent}, "
            f"mantissa_bits={self.mantissa_bits})"
        )
