"""A non-zero value never lands in the zero bin, a finite one never in the non-finite bin
(issue 9, item 5): float64 values are binned from their own bits, not after a cast to
float32 that can underflow to zero or overflow to infinity, and a float32 quotient that
underflows is counted below the range, not as zero."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _optim_db import OPTIMS

import fasthist
from fasthist import Histogram, LogBins
from fasthist.reference.histogram import accumulate_
from fasthist.target import HistTarget

BINS = LogBins()
NB = BINS.num_bins


@pytest.mark.parametrize("info", [i for i in OPTIMS if i.name in ("adam", "rmsprop", "adagrad")], ids=repr)
@pytest.mark.parametrize("grad", [1e-25, 1e30], ids=["underflows-float32", "overflows-float32"])
def test_float64_values_binned_from_their_own_bits(info, grad):
    bins = LogBins(min_exponent=-126, max_exponent=128)
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = info.cls([p], bins=bins, lr=0.0)
    p.grad = torch.full_like(p, grad)
    opt.step()
    h = opt.histogram(p)
    assert (h.zero_count, h.nonfinite_count) == (0, 0)
    st, group = opt.state[p], opt.param_groups[0]
    if info.name == "adam":
        x = st["exp_avg_sq"].sqrt() / math.sqrt(1 - group["betas"][1])
    else:
        x = (st["square_avg"] if info.name == "rmsprop" else st["sum"]).sqrt()
    assert torch.equal(h.counts, bins.count(x))
    assert torch.equal(h.counts, Histogram.from_values(x, bins).counts)


def test_float64_adabelief_finite_values_stay_finite():
    p = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = fasthist.AdaBelief([p], lr=0.0, eps=0.0)
    p.grad = torch.full_like(p, 1e30)  # s ~ 1e57: beyond float32, finite in float64
    opt.step()
    h = opt.histogram(p)
    assert (h.above_count, h.nonfinite_count) == (6, 0)


def test_float64_index_uses_its_own_bits():
    bins = LogBins()
    edge = float(bins.edges[700])
    below_edge = np.nextafter(edge, 0.0)  # rounds up to the edge in float32
    assert float(torch.tensor(below_edge, dtype=torch.float64).float()) == edge
    idx = bins.index(torch.tensor([below_edge, edge], dtype=torch.float64))
    assert idx.tolist() == [bins.FIRST_LOG + 699, bins.FIRST_LOG + 700]


def test_quotient_that_underflows_is_below_not_zero():
    # AdaBelief divides its state by (1-beta2**t)/(1-beta2) >= 1: a subnormal state divided
    # by it can round to 0 in float32 though it is not zero
    target = HistTarget(
        BINS, torch.zeros(1, NB, dtype=torch.int64), torch.zeros(1, NB, dtype=torch.int64), torch.tensor([0])
    )
    v = torch.tensor([2.0**-149, 0.0, 1.0], dtype=torch.float32)
    accumulate_(target, [v], [4.0], sqrt=False)
    row = target.step[0]
    assert (int(row[BINS.ZERO]), int(row[BINS.BELOW]), int(row.sum())) == (1, 1, 3)
