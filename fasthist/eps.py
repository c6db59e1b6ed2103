"""The ε-range rule of Silva & Rodriguez (arXiv 2311.11532), from histograms.

Per tensor, with exact zeros dropped and the remaining ``n`` values sorted as ``a``:
``p_low = a[floor(low*n)]`` and ``p_high = a[floor(high*n)]`` (index clamped to ``n-1``).
Then ``eps_low = min`` over tensors of ``p_low``, ``eps_high = max`` of ``p_high``, each
rounded to the nearest power of ten, ``10**round(log10(x))``; the candidates are the
decades from the rounded low to the rounded high. Tensors with no nonzero value are
skipped. From a histogram each percentile is exact up to the bins' relative accuracy,
so the rounding can differ from a sort-based computation only when a raw bound lies
within that accuracy of a rounding boundary ``10**(k+0.5)``, or outside the bins' range
(it is then reported as the range bound, with a warning); ``ambiguous`` says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .bins import LogBins
from .histogram import batched_quantile

__all__ = ["EpsRange", "EpsRow", "eps_range_from_counts", "round_to_decade"]


def round_to_decade(x: float) -> float:
    """``10**round(log10(x))`` with Python's round-half-even on the exponent."""
    return 10.0 ** round(math.log10(x))


@dataclass(frozen=True)
class EpsRow:
    name: str
    numel: int
    nonzero: int
    low: float  # p_low of the nonzero values, NaN if none
    high: float


@dataclass(frozen=True)
class EpsRange:
    """Result of the ε-range rule: decade-rounded bounds, raw bounds, candidate decades."""

    low: float
    high: float
    low_raw: float
    high_raw: float
    candidates: list[float]
    rows: list[EpsRow] = field(repr=False)
    q_low: float = 0.02
    q_high: float = 0.98
    relative_accuracy: float = 0.0
    # a raw bound is within relative_accuracy of a rounding boundary, or outside the bins' range
    ambiguous: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d


def _near_boundary(x: float, rel: float) -> bool:
    if not math.isfinite(x) or x <= 0:
        return False
    e = math.log10(x)
    boundary = 10.0 ** (math.floor(e) + 0.5)
    return abs(x - boundary) <= rel * boundary * (1 + 1e-12)


def eps_range_from_counts(
    names: Sequence[str],
    counts: Tensor,
    bins: LogBins,
    *,
    low: float = 0.02,
    high: float = 0.98,
) -> EpsRange:
    """Apply the rule to per-tensor histograms ``counts`` ([R, num_bins], int64)."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"Invalid percentiles: low={low}, high={high}; need 0 <= low <= high <= 1")
    if counts.ndim != 2 or counts.shape[0] != len(names):
        raise ValueError(f"counts must be [{len(names)}, num_bins], but got {tuple(counts.shape)}")
    q = torch.tensor([low, high], dtype=torch.float64)
    values = batched_quantile(counts, q, bins, exclude_zeros=True, rule="n").cpu()
    numel = counts.sum(dim=1).cpu()
    nonzero = numel - counts[:, bins.ZERO].cpu()
    rows = [
        EpsRow(str(nm), int(n), int(nz), float(v[0]), float(v[1]))
        for nm, n, nz, v in zip(names, numel.tolist(), nonzero.tolist(), values, strict=True)
    ]
    lows = [r.low for r in rows if r.nonzero > 0]
    highs = [r.high for r in rows if r.nonzero > 0]
    if not lows:
        total = sum(r.numel for r in rows)
        if total == 0:
            raise RuntimeError(
                f"eps_range: the histograms of all {len(rows)} tracked tensors are empty (nothing recorded since "
                "they were created or reset)"
            )
        raise RuntimeError(
            f"eps_range: all {total:,} values of the {len(rows)} tracked tensors are exactly 0 (every gradient so "
            "far was zero); the rule drops zeros, so there is no range"
        )
    bad = [r.name for r in rows if r.nonzero > 0 and not (math.isfinite(r.low) and math.isfinite(r.high))]
    if bad:
        raise RuntimeError(f"eps_range: non-finite percentiles (NaN/inf values) in {', '.join(bad[:5])}")
    low_raw, high_raw = min(lows), max(highs)
    rel = bins.relative_accuracy
    clamped = low_raw <= bins.low or high_raw >= bins.high
    if clamped:
        # the bound lies in the below/above-range bin: only known to be < low or >= high
        warnings.warn(
            f"eps_range: a percentile lies outside the histogram range [{bins.low:.3g}, {bins.high:.3g}) "
            f"(low={low_raw:.3g}, high={high_raw:.3g} are range bounds, not values); "
            "use LogBins with a wider range; the result is marked ambiguous",
            stacklevel=2,
        )
    lo, hi = round_to_decade(low_raw), round_to_decade(high_raw)
    e_lo, e_hi = round(math.log10(lo)), round(math.log10(hi))
    return EpsRange(
        low=lo,
        high=hi,
        low_raw=low_raw,
        high_raw=high_raw,
        candidates=[10.0**e for e in range(e_lo, e_hi + 1)],
        rows=rows,
        q_low=low,
        q_high=high,
        relative_accuracy=rel,
        ambiguous=clamped or _near_boundary(low_raw, rel) or _near_boundary(high_raw, rel),
    )
