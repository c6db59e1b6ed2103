"""Histogram: the quantile guarantee as a property against the exact sorted-index order
statistic ``a[min(floor(q*n), n-1)]``, merging, the out-of-range rules, the share above ε
(per row) against the raw values, bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fasthist
from fasthist import Histogram, LogBins
from fasthist.histogram import batched_count_above, batched_fraction_above

BINS = [LogBins(), LogBins(mantissa_bits=3), LogBins(-30, 2, 7)]


def make_values(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if kind == "span20":  # log-uniform over 20 decades
        x = 10.0 ** (-16 + 20 * u)
    elif kind == "bimodal":
        x = torch.where(u < 0.5, 1e-9 * (1 + u), 1e-2 * (1 + u))
    elif kind == "constant":
        x = torch.full((n,), 3.7e-5, dtype=torch.float64)
    elif kind == "zeros":  # mostly exact zeros (dead units, unused embedding rows)
        x = torch.where(u < 0.7, 0.0, 10.0 ** (-10 + 6 * u))
    elif kind == "outside":  # below and above the default range, and non-finite
        x = 10.0 ** (-30 + 40 * u)
        x[::17] = math.inf
        x[::23] = math.nan
    elif kind == "signed":
        x = torch.randn(n, generator=g, dtype=torch.float64) * 1e-3
    else:
        raise ValueError(kind)
    return x.to(torch.float32)


def exact_order_statistic(x: torch.Tensor, k: int) -> float:
    return float(torch.sort(x.reshape(-1).abs()).values[k])  # NaN sorts last, after +inf


def rank(q: float, n: int) -> int:
    """The paper's sorted-index rank, clamped to the last element; ``q * n`` is the float64
    product, as the histograms compute it (exactly, for n <= 2**53)."""
    return min(math.floor(q * n), n - 1)


def check_guarantee(r: float, a: float, bins: LogBins) -> None:
    if math.isnan(a) or math.isinf(a):
        assert math.isnan(r)
    elif a == 0:
        assert r == 0.0
    elif a < bins.low:
        assert r == bins.low
    elif a >= bins.high:
        assert r == bins.high
    else:
        assert abs(r - a) <= bins.relative_accuracy * a * (1 + 1e-9), (r, a)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["span20", "bimodal", "constant", "zeros", "outside", "signed"]),
    n=st.integers(1, 3000),
    seed=st.integers(0, 2**31 - 1),
    qs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
    b=st.sampled_from(BINS),
)
def test_quantile_guarantee(kind, n, seed, qs, b):
    x = make_values(kind, n, seed)
    h = Histogram.from_values(x, b)
    assert h.count == n
    got = h.quantile(qs)
    for q, r in zip(qs, got.tolist(), strict=True):
        check_guarantee(r, exact_order_statistic(x, rank(q, n)), b)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=200), st.floats(0, 1))
def test_quantile_guarantee_raw_floats(values, q):
    x = torch.tensor(values, dtype=torch.float32)
    h = Histogram.from_values(x)
    check_guarantee(h.quantile(q), exact_order_statistic(x, rank(q, len(values))), h.bins)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1), st.integers(0, 500), st.integers(0, 500), st.sampled_from(["span20", "zeros", "outside"])
)
def test_merge_is_histogram_of_concatenation(seed, n1, n2, kind):
    a, b = make_values(kind, n1, seed), make_values(kind, n2, seed + 1)
    merged = Histogram.from_values(a) + Histogram.from_values(b)
    assert merged == Histogram.from_values(torch.cat([a, b]))
    assert sum([Histogram.from_values(a), Histogram.from_values(b)]) == merged


@pytest.mark.parametrize("kind", ["span20", "bimodal", "zeros"])
def test_quantile_through_the_optimizer(kind):
    # After the first step sqrt(v_hat) = |g| up to rounding: any distribution can be pushed
    # through the real optimizer and compared with the exact sorted |g|.
    g = make_values(kind, 4000, 7).reshape(40, 100)
    g = g.clamp(max=1e15)  # g*g must stay finite in float32
    p = torch.zeros_like(g, requires_grad=True)
    p.grad = g.clone()
    opt = fasthist.Adam([p])
    opt.step()
    h = opt.histogram()
    n = g.numel()
    for q in (0.0, 0.02, 0.25, 0.5, 0.98, 1.0):
        a = exact_order_statistic(g, rank(q, n))
        r = h.quantile(q)
        if a == 0 or a < h.bins.low * 2:
            continue
        assert abs(r - a) <= (h.relative_accuracy + 1e-5) * a


def test_quantile_exclude_zeros():
    x = torch.cat([torch.zeros(900), torch.full((100,), 2.0)])
    h = Histogram.from_values(x)
    assert h.quantile(0.5) == 0.0
    assert h.quantile(0.5, exclude_zeros=True) == pytest.approx(2.0, rel=h.relative_accuracy)
    assert math.isnan(Histogram.from_values(torch.zeros(5)).quantile(0.5, exclude_zeros=True))


def test_empty_histogram():
    h = Histogram.empty()
    assert h.count == 0
    assert math.isnan(h.quantile(0.5))
    assert torch.isnan(h.quantile([0.1, 0.9])).all()
    assert math.isnan(h.fraction_above(1e-8))


def test_quantile_returns_types():
    h = Histogram.from_values(torch.rand(100))
    assert isinstance(h.quantile(0.5), float)
    out = h.quantile([0.1, 0.5])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == (2,)
    assert h.quantile(torch.tensor([0.1, 0.5])).shape == (2,)


def test_fraction_above():
    b = LogBins()
    x = torch.tensor([0.0, 1e-9, 1e-7, 1e-3, 1.0, math.nan, math.inf])
    h = Histogram.from_values(x, b)
    assert h.fraction_above(1e-8) == pytest.approx(3 / 7)  # non-finite values are never "above"
    assert h.fraction_above(1e-8, exclude_zeros=True) == pytest.approx(3 / 6)
    assert h.fraction_above(-1.0) == pytest.approx(5 / 7)
    # at bin edges the answer is exact for every value
    e = float(b.edges[500])
    vals = torch.exp2(torch.linspace(-60, 10, 5001)).float()
    h2 = Histogram.from_values(vals, b)
    assert h2.fraction_above(e) == pytest.approx(float((vals.double() >= e).sum()) / vals.numel())


def test_to_numpy_and_edges():
    x = torch.cat([torch.zeros(3), torch.rand(100) + 0.5, torch.tensor([1e-30, 1e30, math.nan])])
    h = Histogram.from_values(x)
    counts, edges = h.to_numpy()
    assert isinstance(counts, np.ndarray) and counts.shape == (h.bins.num_log_bins,)
    assert edges.shape == (h.bins.num_log_bins + 1,) and np.all(np.diff(edges) > 0)
    assert counts.sum() == 100
    assert (h.zero_count, h.below_count, h.above_count, h.nonfinite_count) == (3, 1, 1, 1)


def test_bad_input():
    h = Histogram.from_values(torch.rand(10))
    with pytest.raises(ValueError, match=r"quantile\(\) q values must be in the range \[0, 1\]"):
        h.quantile(1.5)
    with pytest.raises(ValueError, match="different bins"):
        h + Histogram.from_values(torch.rand(10), LogBins(mantissa_bits=4))
    with pytest.raises(TypeError, match="bins must be a fasthist.LogBins"):
        Histogram(torch.zeros(5, dtype=torch.int64), {"mantissa_bits": 5})
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        Histogram(torch.zeros(2596), LogBins())


def share_bounds(x: torch.Tensor, eps: float, bins: LogBins) -> tuple[int, int]:
    """``(sure, unsure)`` for the raw values ``x``: how many are above ``eps`` for certain
    under the stated rule, and how many may go either way. Inside the range an element is
    above iff ``a > eps``, except within ``[eps/(1+ρ), eps/(1-ρ)]`` of it (the bin holding
    eps, counted whole); 1e-9 widens that window for the float64 rounding of the edges and
    representatives (the representative's error reaches ρ·a exactly at the bin's edges).
    Out of range, zeros count as 0, below-range values as ``low``, above-range ones as
    ``high``; non-finite values are never above."""
    a = x.double().abs()
    rho = bins.relative_accuracy
    inside = (a >= bins.low) & (a < bins.high)
    as_bound = torch.where(a == 0, 0.0, torch.where(a < bins.low, bins.low, bins.high))
    above = torch.where(inside, a > eps, as_bound > eps) & a.isfinite()
    window = inside & (a >= eps / (1 + rho) * (1 - 1e-9)) & (a <= eps / (1 - rho) * (1 + 1e-9))
    return int((above & ~window).sum()), int(window.sum())


@settings(max_examples=120, deadline=None)
@given(
    kinds=st.lists(
        st.sampled_from(["span20", "bimodal", "constant", "zeros", "outside", "signed"]), min_size=1, max_size=5
    ),
    n=st.integers(1, 2000),
    seed=st.integers(0, 2**31 - 1),
    log_eps=st.lists(st.floats(-25.0, 6.0), min_size=5, max_size=5),
    b=st.sampled_from(BINS),
)
def test_share_above_per_row_against_the_raw_values(kinds, n, seed, log_eps, b):
    """One call for several rows, each with its own ε (inside and outside the bins' range):
    each row's share is the raw values' share above its ε, up to the elements of the bin
    holding ε; at a bin edge it is exactly the share of values >= ε."""
    xs = [make_values(kind, n, seed + i) for i, kind in enumerate(kinds)]
    counts = torch.stack([b.count(x) for x in xs])
    eps = torch.tensor([10.0**e for e in log_eps[: len(xs)]], dtype=torch.float64)
    got = batched_fraction_above(counts, eps, b)
    assert got.shape == (len(xs),) and got.dtype == torch.float64
    for x, e, share in zip(xs, eps.tolist(), got.tolist(), strict=True):
        sure, unsure = share_bounds(x, e, b)
        assert sure <= round(share * n) <= sure + unsure, (e, share * n, sure, unsure)
    # at the bin edges every element is classified exactly: above iff a >= edge
    edges = b.edges.double()
    at = edges[torch.linspace(0, len(edges) - 2, 7).long()]
    got = batched_fraction_above(counts, at.expand(len(xs), -1), b)
    assert got.shape == (len(xs), len(at))
    for x, row in zip(xs, got, strict=True):
        a = x.double().abs()
        want = torch.stack([((a >= e) & a.isfinite()).sum() for e in at]).double() / n
        assert torch.equal(row, want)  # the same integer counts over the same n


def test_share_above_special_values():
    b = LogBins()
    x = torch.tensor([0.0, 1e-30, 1e-9, 1e-3, 1e10, math.nan, math.inf])
    c = torch.stack([b.count(x), b.count(x), torch.zeros(b.num_bins, dtype=torch.int64)])
    got = batched_fraction_above(c, torch.tensor([-1.0, math.nan, 1e-8]), b)
    assert got[0] == 5 / 7  # zeros above a negative ε; non-finite values never
    assert got[1].isnan() and got[2].isnan()  # NaN ε; empty row
    # ε below the range: the below-range value counts as above; at or past high no above-range one
    assert batched_fraction_above(c[:1], 1e-35, b)[0] == 4 / 7
    assert batched_fraction_above(c[:1], b.high, b)[0] == 0.0
    assert batched_fraction_above(c[:1], 1e-8, b, exclude_zeros=True)[0] == 2 / 6


def test_counts_above_are_the_shares_numerators_and_merge_exactly():
    """batched_count_above counts, per row and ε, the elements whose bin representative
    exceeds ε (the oracle: a mask over the representatives); the share is that count over
    the row's total, bit for bit; and the share of several rows with their own ε, the
    integrations' summary, is exact from the counts."""
    b = LogBins()
    x = torch.tensor([0.0, 1e-30, 1e-9, 1e-3, 1e-3, 1e10, math.nan, math.inf])
    rows = torch.stack([b.count(x), b.count(x[2:]), b.count(x[:5]), torch.zeros(b.num_bins, dtype=torch.int64)])
    eps = torch.tensor([-1.0, 1e-8, math.nan, 1e-8], dtype=torch.float64)
    above, n = batched_count_above(rows, eps, b)
    reps = b.representatives_on("cpu")
    want = torch.stack([r[reps > e].sum() for r, e in zip(rows, eps.tolist(), strict=True)])  # NaN ε: none
    assert above.dtype == torch.int64 and torch.equal(above, want) and torch.equal(n, rows.sum(dim=1))
    share = batched_fraction_above(rows, eps, b)
    assert torch.equal(share[:2], above[:2].double() / n[:2].double())
    assert share[2].isnan() and share[3].isnan()  # NaN ε; empty row
    both = rows[:2]
    over_both = int(batched_count_above(both, eps[:2], b)[0].sum()) / int(both.sum())
    assert over_both == (6 + 3) / (8 + 6)  # zeros, tiny, 1e-9, 1e-3 twice, 1e10 above -1; 1e-3 twice, 1e10 above 1e-8
    # K thresholds per row: [R, K] counts, as batched_fraction_above's shares
    edges = b.edges[[10, 500, 1000]].double().expand(2, -1)
    k_above, _ = batched_count_above(both, edges, b)
    assert k_above.shape == (2, 3) and torch.equal(
        batched_fraction_above(both, edges, b), k_above.double() / both.sum(dim=1, keepdim=True).double()
    )


def test_one_quantile_rule_for_the_eps_range_and_every_query():
    """The ε-range bounds are the per-tensor quantiles every query returns, value for value:
    100 distinct nonzero magnitudes, one per bin, where a[floor(0.98*n)] and
    a[floor(0.98*(n-1))] are different elements in different bins."""
    # 0.7 binades apart, inside LogBins()' range, and g*g*(1-beta2) a normal float32
    g = (2.0 ** (-57.5 + 0.7 * torch.arange(100, dtype=torch.float64))).float()
    p = torch.zeros(100, requires_grad=True)
    z = torch.zeros(10, requires_grad=True)
    opt = fasthist.Adam([("p", p), ("z", z)])
    p.grad, z.grad = g, torch.cat([torch.zeros(3), g[:7]])
    opt.step()
    rng = opt.eps_range()
    hists = opt.histograms()
    names, q = opt.quantiles([0.02, 0.98], exclude_zeros=True)
    for row, qs in zip(rng.rows, q.tolist(), strict=True):
        assert [row.low, row.high] == hists[row.name].quantile([0.02, 0.98], exclude_zeros=True).tolist() == qs
    assert rng.high_raw == hists[rng.high_tensor].quantile(0.98, exclude_zeros=True)
    assert rng.low_raw == hists[rng.low_tensor].quantile(0.02, exclude_zeros=True)
    want = float(g[min(math.floor(0.98 * 100), 99)])
    # against the raw value: sqrt(v_hat) is |g| up to rounding (1e-5 covers it)
    assert abs(hists["p"].quantile(0.98) - want) <= (hists["p"].relative_accuracy + 1e-5) * want


def test_a_meta_model_steps_and_every_query_says_why_it_has_no_answer():
    model = torch.nn.Linear(4, 3, device="meta")
    opt = fasthist.Adam(model.named_parameters())
    model(torch.randn(2, 4, device="meta")).sum().backward()
    opt.step()  # as torch.optim.Adam does
    queries = [
        opt.histograms,
        opt.histogram,
        lambda: opt.histogram("weight"),
        lambda: opt.quantiles(0.5),
        opt.eps_range,
        lambda: Histogram(torch.zeros(LogBins().num_bins, dtype=torch.int64, device="meta"), LogBins()),
    ]
    for query in queries:
        with pytest.raises(RuntimeError, match="on the meta device, which holds shapes but no values"):
            query()
