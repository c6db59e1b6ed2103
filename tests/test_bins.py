"""LogBins: the layout (golden), the bit-pattern binning against a brute-force search
over the edges, special values, and bad input."""

import math

import pytest
import torch

from fasthist import LogBins


def test_default_layout_golden():
    # A change here changes every saved histogram: make it deliberately.
    b = LogBins()
    assert b.spec == (-67, 14, 5)
    assert b.num_log_bins == 81 * 32 == 2592
    assert b.num_bins == 2596
    assert (b.ZERO, b.BELOW, b.FIRST_LOG, b.above, b.nonfinite) == (0, 1, 2, 2594, 2595)
    assert b.low == 2.0**-67 and b.low <= 1e-20
    assert b.high == 2.0**14 and b.high >= 1e4
    assert b.relative_accuracy == pytest.approx(1 / 65) and b.relative_accuracy <= 0.02
    e = b.edges
    assert e.dtype == torch.float64 and e.numel() == 2593
    assert e[0] == 2.0**-67 and e[32] == 2.0**-66 and e[-1] == 2.0**14
    assert e[1] == 2.0**-67 * (1 + 1 / 32)
    assert bool((e[1:] > e[:-1]).all())
    idx = b.index(torch.tensor([1.0, 1.5, 1e-8, 1e-20, 1e4]))
    assert idx.tolist() == [2 + 67 * 32, 2 + 67 * 32 + 16, 1292, 17, 2569]


@pytest.mark.parametrize("bins", [LogBins(), LogBins(-10, 3, 0), LogBins(-20, 20, 7), LogBins(-126, 128, 2)])
def test_index_matches_edges(bins):
    g = torch.Generator().manual_seed(0)
    log2 = torch.empty(20000, dtype=torch.float64).uniform_(
        bins.min_exponent - 3, min(bins.max_exponent + 3, 127.9), generator=g
    )
    x = torch.exp2(log2).to(torch.float32)
    x = torch.cat([x, bins.edges.to(torch.float32)])  # exact edges too
    x = x[torch.isfinite(x)]  # 2**128 overflows float32: that is the non-finite bin's business
    idx = bins.index(x)
    xd = x.double()
    expect = torch.bucketize(xd, bins.edges, right=True) - 1 + bins.FIRST_LOG  # edge e_j starts bin j
    expect = torch.where(xd < bins.low, bins.BELOW, expect)
    expect = torch.where(xd >= bins.high, bins.above, expect)
    assert torch.equal(idx, expect)


def test_special_values_each_in_one_bin():
    b = LogBins()
    x = torch.tensor([0.0, -0.0, 1e-45, 1e-40, 1e-30, -3.0, 3.0, 1e30, math.inf, -math.inf, math.nan])
    idx = b.index(x).tolist()
    assert idx[:2] == [b.ZERO, b.ZERO]
    assert idx[2:5] == [b.BELOW] * 3  # subnormals and tiny normals
    assert idx[5] == idx[6]  # magnitudes: the sign is ignored
    assert idx[7] == b.above
    assert idx[8:] == [b.nonfinite] * 3
    counts = b.count(x)
    assert counts.dtype == torch.int64 and counts.sum() == x.numel()


def test_index_of_half_precision_is_exact():
    b = LogBins()
    x = torch.randn(1000).abs()
    for dt in (torch.bfloat16, torch.float16):
        y = x.to(dt)
        assert torch.equal(b.index(y), b.index(y.float()))


def test_from_range():
    assert LogBins.from_range() == LogBins()
    b = LogBins.from_range(1e-8, 1.0, relative_accuracy=0.005)
    assert b.low <= 1e-8 and b.high > 1.0 and b.relative_accuracy <= 0.005
    assert LogBins.from_range(1e-8, 1.0, relative_accuracy=0.05).mantissa_bits < b.mantissa_bits


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        ({"min_exponent": 3, "max_exponent": 3}, ValueError, "Invalid LogBins exponent range"),
        ({"min_exponent": -200}, ValueError, "Invalid LogBins exponent range"),
        ({"mantissa_bits": 11}, ValueError, "Invalid LogBins mantissa_bits: 11"),
        ({"mantissa_bits": 2.0}, TypeError, "mantissa_bits must be an int"),
    ],
)
def test_bad_bins(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        LogBins(**kwargs)


def test_bad_from_range_and_index():
    with pytest.raises(ValueError, match="Invalid LogBins range"):
        LogBins.from_range(1.0, 0.5)
    with pytest.raises(ValueError, match="Invalid relative_accuracy"):
        LogBins.from_range(relative_accuracy=0.0)
    with pytest.raises(TypeError, match="floating point"):
        LogBins().index(torch.arange(3))


def test_frozen_and_hashable():
    b = LogBins()
    with pytest.raises(AttributeError):
        b.mantissa_bits = 3
    assert hash(b) == hash(LogBins()) and b == LogBins() and b != LogBins(mantissa_bits=4)


def test_float64_beyond_float32_keeps_its_side():
    b = LogBins()
    x = torch.tensor([1e300, -1e300, 1e-50, 0.0, math.inf, math.nan], dtype=torch.float64)
    assert b.index(x).tolist() == [b.above, b.above, b.BELOW, b.ZERO, b.nonfinite, b.nonfinite]


def test_from_range_refuses_what_it_cannot_cover():
    with pytest.raises(ValueError, match="float32's normal range"):
        LogBins.from_range(1e-40, 1e4)
    with pytest.raises(ValueError, match="Invalid relative_accuracy: 0.0001"):
        LogBins.from_range(relative_accuracy=1e-4)
