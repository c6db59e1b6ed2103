"""Histogram: the quantile guarantee as a property against the exact sorted-index order
statistic, merging, the out-of-range rules, fraction_above, plotting output, bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fasthist
from fasthist import Histogram, LogBins

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
        check_guarantee(r, exact_order_statistic(x, math.floor(q * (n - 1))), b)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=200), st.floats(0, 1))
def test_quantile_guarantee_raw_floats(values, q):
    x = torch.tensor(values, dtype=torch.float32)
    h = Histogram.from_values(x)
    check_guarantee(h.quantile(q), exact_order_statistic(x, math.floor(q * (len(values) - 1))), h.bins)


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
        a = exact_order_statistic(g, math.floor(q * (n - 1)))
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
