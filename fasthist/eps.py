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

Beyond the paper: the result names the tensor that sets each bound and how far it sits from
the others, and flags *numerically dead* values (see :data:`DEAD_RATIO`): rounding noise
where a gradient is exactly zero in exact arithmetic, which the rule as written lets set
the low bound. They are counted by default, as the paper does; ``exclude=`` and
``drop_dead=True`` give the range without them, and ``paper``/``without_dead`` hold both.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .bins import LogBins
from .histogram import batched_quantile

__all__ = [
    "DEAD_RATIO",
    "EpsBounds",
    "EpsRange",
    "EpsRow",
    "Exclude",
    "dead_bins",
    "eps_range_from_counts",
    "excluded_names",
    "names_matching",
    "round_to_decade",
]


def round_to_decade(x: float) -> float:
    """``10**round(log10(x))`` with Python's round-half-even on the exponent."""
    return 10.0 ** round(math.log10(x))


#: A nonzero value more than this factor below the model's bulk (the median over tensors of
#: their 98% points, in log scale) is *numerically dead*: 2**-16 = 128 float32 ulps (2**-23
#: each) of the bulk. Rounding noise in a float32 gradient that is exactly zero in exact
#: arithmetic (a key bias, whose gradient softmax cancels; a bias right before BatchNorm,
#: whose gradient the mean subtraction cancels) is a sum of N terms of about the bulk's size
#: g whose rounding errors add up to about 2**-24 * g * sqrt(N): below 2**-16 * g for sums
#: of up to 2**16 terms. Measured: 6e-8 and 1.3e-7 of the bulk for those two biases; 3e-3
#: for a live tensor whose gradients are 1000x smaller than the rest. The test is on
#: magnitude alone: a live tensor whose gradients are truly 2**16 times smaller than the
#: rest's is flagged too (and, by default, still counted), and the noise of much longer sums
#: (or of bf16/fp16 gradients, 2**-8 relative) sits above the floor and is not caught.
#:
#: Only tensors whose own low percentile lies below the floor are flagged (whole, or the
#: part below the floor): a few tail values of a live tensor below it do not move the rule.
DEAD_RATIO = 2.0**-16

#: ``exclude=``: a name or glob pattern (``fnmatch``, case-sensitive), a list of them, or a
#: predicate ``name -> bool``. A string that is exactly a tensor's name picks that tensor
#: alone, even when it holds glob characters (``"layers[0].weight"``); any other string is a
#: pattern, where ``[[]`` matches a literal ``[``.
Exclude = str | Iterable[str] | Callable[[str], bool] | None


@dataclass(frozen=True)
class EpsRow:
    name: str
    numel: int
    nonzero: int
    low: float  # p_low of the nonzero values, NaN if none
    high: float
    dead: int = 0  # nonzero values below the range's dead_floor (numerically dead)
    excluded: bool = False  # left out by exclude=

    @property
    def dead_share(self) -> float:
        """Share of the nonzero values that are numerically dead (0 when there are none)."""
        return self.dead / self.nonzero if self.nonzero else 0.0


@dataclass(frozen=True)
class EpsBounds:
    """One application of the rule: the bounds, and which tensor sets each.

    ``low_decades``: how many decades the tensor setting the low bound sits below the median
    (over the tensors counted, in log scale) of their low percentiles; ``high_decades``: how
    far the one setting the high bound sits above the median of the high percentiles.
    """

    low: float
    high: float
    low_raw: float
    high_raw: float
    candidates: list[float]
    ambiguous: bool
    low_tensor: str
    high_tensor: str
    low_decades: float
    high_decades: float
    tensors: int  # tensors counted (with at least one value left)


@dataclass(frozen=True)
class EpsRange:
    """Result of the ε-range rule: decade-rounded bounds, raw bounds, candidate decades.

    The top-level bounds are the range asked for: the paper's rule over every tensor by
    default, or without the tensors of ``exclude=`` and (``drop_dead=True``) without the
    numerically dead values. ``paper`` is always the rule as written, over everything;
    ``without_dead`` the rule without the dead values (and the excluded tensors), or None
    when no counted tensor has a dead value. ``dead_floor``: values below it are dead
    (:data:`DEAD_RATIO` times the model's bulk); ``rows[i].dead`` counts them per tensor.
    ``paper`` is None only when a tensor left out by ``exclude=`` has non-finite (NaN/inf)
    percentiles: over everything, the rule as written has no answer.
    """

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
    low_tensor: str = ""
    high_tensor: str = ""
    low_decades: float = 0.0
    high_decades: float = 0.0
    dead_floor: float = 0.0
    drop_dead: bool = False
    excluded: list[str] = field(default_factory=list)
    paper: EpsBounds | None = field(default=None, repr=False)
    without_dead: EpsBounds | None = field(default=None, repr=False)

    @property
    def dead(self) -> list[str]:
        """Names of the tensors with numerically dead values."""
        return [r.name for r in self.rows if r.dead]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [{**asdict(r), "dead_share": r.dead_share} for r in self.rows]
        d["dead"] = self.dead
        return d


def _near_boundary(x: float, rel: float) -> bool:
    if not math.isfinite(x) or x <= 0:
        return False
    e = math.log10(x)
    boundary = 10.0 ** (math.floor(e) + 0.5)
    return abs(x - boundary) <= rel * boundary * (1 + 1e-12)


def _log_median(values: Sequence[float]) -> float:
    logs = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    return 10.0 ** statistics.median(logs) if logs else math.nan


def excluded_names(names: Sequence[str], exclude: Exclude) -> list[bool]:
    """Per name, whether ``exclude`` (see :data:`Exclude`) leaves it out. A pattern that
    matches no name is an error (a typo must not silently exclude nothing)."""
    return names_matching(names, exclude, "exclude", "tensor")


def names_matching(names: Sequence[str], spec: Exclude, what: str, noun: str) -> list[bool]:
    """Per name, whether ``spec`` (a name or glob pattern, several, or a predicate; None:
    none) picks it; ``what`` names the argument in errors, ``noun`` the names. A string
    equal to one of ``names`` picks that name alone (names may hold ``[``, ``*``, ``?``);
    any other is an ``fnmatch`` pattern. A pattern that matches no name is a
    ``ValueError``, a non-string pattern a ``TypeError``."""
    if spec is None:
        return [False] * len(names)
    if callable(spec):
        return [bool(spec(n)) for n in names]
    patterns = [spec] if isinstance(spec, str) else list(spec)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must be names, glob patterns or a predicate, but got {bad[0]!r}")
    exact = set(names)
    picks = [{p} if p in exact else {n for n in names if fnmatch.fnmatchcase(n, p)} for p in patterns]
    unmatched = [p for p, hit in zip(patterns, picks, strict=True) if not hit]
    if unmatched:
        raise ValueError(f"Invalid {what}: {unmatched[0]!r} matches no {noun}; tensors: {', '.join(names[:8])}")
    chosen = set().union(*picks)
    return [n in chosen for n in names]


def dead_bins(bins: LogBins, floor: float) -> Tensor:
    """bool [num_bins]: the bins whose every value is nonzero and below ``floor``."""
    mask = torch.zeros(bins.num_bins, dtype=torch.bool)
    if floor > 0:
        mask[bins.BELOW] = floor >= bins.low
        mask[bins.FIRST_LOG : bins.above] = bins.edges[1:] <= floor
    return mask


def _bounds(rows: Sequence[tuple[str, float, float]], rel: float) -> EpsBounds:
    """The rule on per-tensor (name, p_low, p_high): envelope, attribution, rounding."""
    low_name, low_raw, _ = min(rows, key=lambda r: r[1])
    high_name, _, high_raw = max(rows, key=lambda r: r[2])
    lo, hi = round_to_decade(low_raw), round_to_decade(high_raw)
    e_lo, e_hi = round(math.log10(lo)), round(math.log10(hi))
    return EpsBounds(
        low=lo,
        high=hi,
        low_raw=low_raw,
        high_raw=high_raw,
        candidates=[10.0**e for e in range(e_lo, e_hi + 1)],
        ambiguous=_near_boundary(low_raw, rel) or _near_boundary(high_raw, rel),
        low_tensor=low_name,
        high_tensor=high_name,
        low_decades=math.log10(_log_median([r[1] for r in rows]) / low_raw),
        high_decades=math.log10(high_raw / _log_median([r[2] for r in rows])),
        tensors=len(rows),
    )


def eps_range_from_counts(
    names: Sequence[str],
    counts: Tensor,
    bins: LogBins,
    *,
    low: float = 0.02,
    high: float = 0.98,
    exclude: Exclude = None,
    drop_dead: bool = False,
) -> EpsRange:
    """Apply the rule to per-tensor histograms ``counts`` ([R, num_bins], int64); with
    ``exclude`` (names, glob patterns or a predicate) without those tensors, with
    ``drop_dead`` without the numerically dead values (see :data:`DEAD_RATIO`)."""
    _check_inputs(names, counts, low, high)
    out = excluded_names(names, exclude)
    counts = counts.cpu()
    q = torch.tensor([low, high], dtype=torch.float64)
    values, numel, nonzero = _percentiles(names, counts, q, bins, out)
    floor, dead, live = _dead_values(counts, values, nonzero, q, bins)
    rows = [
        EpsRow(str(nm), int(n), int(nz), float(v[0]), float(v[1]), int(d), bool(x))
        for nm, n, nz, v, d, x in zip(names, numel.tolist(), nonzero.tolist(), values, dead.tolist(), out, strict=True)
    ]
    rel = bins.relative_accuracy
    paper, without_dead, chosen = _apply_rule(rows, live, rel, drop_dead)
    clamped = _warn_if_clamped(chosen, bins)
    return EpsRange(
        low=chosen.low,
        high=chosen.high,
        low_raw=chosen.low_raw,
        high_raw=chosen.high_raw,
        candidates=chosen.candidates,
        rows=rows,
        q_low=low,
        q_high=high,
        relative_accuracy=rel,
        ambiguous=clamped or chosen.ambiguous,
        low_tensor=chosen.low_tensor,
        high_tensor=chosen.high_tensor,
        low_decades=chosen.low_decades,
        high_decades=chosen.high_decades,
        dead_floor=floor,
        drop_dead=bool(drop_dead),
        excluded=[r.name for r in rows if r.excluded],
        paper=paper,
        without_dead=without_dead,
    )


def _check_inputs(names: Sequence[str], counts: Tensor, low: float, high: float) -> None:
    real = (int, float)
    if (
        isinstance(low, bool)
        or isinstance(high, bool)
        or not (isinstance(low, real) and isinstance(high, real) and 0.0 <= low <= high <= 1.0)
    ):
        raise ValueError(f"Invalid percentiles: low={low}, high={high}; need 0 <= low <= high <= 1")
    if counts.ndim != 2 or counts.shape[0] != len(names):
        raise ValueError(f"counts must be [{len(names)}, num_bins], but got {tuple(counts.shape)}")


def _percentiles(
    names: Sequence[str], counts: Tensor, q: Tensor, bins: LogBins, excluded: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per tensor: its percentiles ``q`` of the nonzero values ([R, 2], float64, NaN where
    none), its element count and its nonzero count. Raises when every value is zero (or none
    was recorded) and when a tensor with nonzero values that is not ``excluded`` has a
    non-finite percentile (a tensor whose values are NaN/inf can be left out by name)."""
    values = batched_quantile(counts, q, bins, exclude_zeros=True)
    numel = counts.sum(dim=1)
    nonzero = numel - counts[:, bins.ZERO]
    _check_nonempty(names, numel.tolist(), nonzero.tolist())
    bad = [
        n
        for n, nz, v, x in zip(names, nonzero.tolist(), values.tolist(), excluded, strict=True)
        if nz and not x and not all(map(math.isfinite, v))
    ]
    if bad:
        raise RuntimeError(
            f"eps_range: non-finite percentiles (NaN/inf values) in {', '.join(bad[:5])}; "
            "exclude= leaves such a tensor out"
        )
    return values, numel, nonzero


def _dead_values(
    counts: Tensor, values: Tensor, nonzero: Tensor, q: Tensor, bins: LogBins
) -> tuple[float, Tensor, Tensor]:
    """``(floor, dead, live)``: the dead floor, :data:`DEAD_RATIO` times the log-scale median
    over tensors with a nonzero value of their high percentile; per tensor the count of its
    values in bins wholly below the floor, only where its own low percentile lies below the
    floor (else 0); and the percentiles ``q`` of each tensor without those dead values."""
    floor = _log_median([v[1] for nz, v in zip(nonzero.tolist(), values.tolist(), strict=True) if nz]) * DEAD_RATIO
    mask = dead_bins(bins, floor)
    # only where the tensor's own low percentile is dead: a live tensor's far tail is not a dead part
    dead = counts[:, mask].sum(dim=1) * (values[:, 0] < floor)
    live_counts = counts.clone()
    live_counts[(dead > 0).nonzero()[:, 0].unsqueeze(1), mask.nonzero()[:, 0]] = 0
    live = batched_quantile(live_counts, q, bins, exclude_zeros=True)
    return floor, dead, live


def _apply_rule(
    rows: Sequence[EpsRow], live: Tensor, rel: float, drop_dead: bool
) -> tuple[EpsBounds | None, EpsBounds | None, EpsBounds]:
    """``(paper, without_dead, chosen)``: the rule over every tensor with a nonzero value
    (None when an excluded one has non-finite percentiles: the rule over everything has no
    answer then); over the tensors not excluded, without their dead values (None when none
    of them has any); and the one asked for (``drop_dead``: the latter, else the rule over
    the tensors not excluded, dead values counted)."""
    every = [(r.name, r.low, r.high) for r in rows if r.nonzero]
    finite = all(math.isfinite(lo) and math.isfinite(hi) for _, lo, hi in every)
    paper = _bounds(every, rel) if finite else None
    kept_live = [
        (r.name, float(v[0]), float(v[1]))
        for r, v in zip(rows, live, strict=True)
        if not r.excluded and r.nonzero > r.dead
    ]
    without_dead = _bounds(kept_live, rel) if kept_live and any(r.dead for r in rows if not r.excluded) else None
    if drop_dead:
        chosen_rows = kept_live
    else:
        chosen_rows = [(r.name, r.low, r.high) for r in rows if r.nonzero and not r.excluded]
    if not chosen_rows:
        raise ValueError("eps_range: exclude= and drop_dead leave no tensor with a nonzero value")
    return paper, without_dead, _bounds(chosen_rows, rel)


def _warn_if_clamped(chosen: EpsBounds, bins: LogBins) -> bool:
    """Whether a chosen bound lies in the below/above-range bin, where it is only known to be
    ``< bins.low`` or ``>= bins.high``; warns (at the caller of eps_range_from_counts) if so."""
    clamped = chosen.low_raw <= bins.low or chosen.high_raw >= bins.high
    if clamped:
        warnings.warn(
            f"eps_range: a percentile lies outside the histogram range [{bins.low:.3g}, {bins.high:.3g}) "
            f"(low={chosen.low_raw:.3g}, high={chosen.high_raw:.3g} are range bounds, not values); "
            "use LogBins with a wider range; the result is marked ambiguous",
            stacklevel=3,
        )
    return clamped


def _check_nonempty(names: Sequence[str], numel: list[int], nonzero: list[int]) -> None:
    if any(nonzero):
        return
    total = sum(numel)
    if total == 0:
        raise RuntimeError(
            f"eps_range: the histograms of all {len(names)} tracked tensors are empty (nothing recorded since "
            "they were created or reset)"
        )
    raise RuntimeError(
        f"eps_range: all {total:,} values of the {len(names)} tracked tensors are exactly 0 (every gradient so "
        "far was zero); the rule drops zeros, so there is no range"
    )
