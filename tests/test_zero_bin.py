"""A non-zero value never lands in the zero bin, a finite one never in the non-finite bin
: float64 values are binned from their own bits, not after a cast to
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


# Layouts whose zero bin a kernel could get wrong: low key 1 (LogBins(-126, e, 0), where the
# key of +0 is the below-range key itself), the full float32 range, the top binade, and the
# default for contrast.
ZERO_LAYOUTS = {
    "low-key-1": LogBins(-126, 0, 0),
    "low-key-1-all-finite": LogBins(-126, 128, 0),
    "top-binade": LogBins(127, 128, 4),
    "default": LogBins(),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(ZERO_LAYOUTS))
@pytest.mark.parametrize("info", [i for i in OPTIMS if i.cls.declaration.kernel is not None], ids=repr)
def test_zero_and_below_bins_agree_across_backends(info, name):
    """Exact zeros of the histogrammed value (dead rows of gradients, gradients whose squares
    underflow) counted by the Triton backend exactly as by the torch backend (``LogBins.index``
    of the value): the whole histogram equal, zero and below-range bins included. (No
    optimizer's value is subnormal, so the below-range bin of low key 1 stays empty here; the
    device formulas are checked on subnormals in ``test_hist_strategy.py``.)"""
    pytest.importorskip("triton")
    from fasthist import backend

    if backend.kernels_module(interpret=not torch.cuda.is_available()) is None:
        pytest.skip("fasthist.kernels not importable in this process")
    bins = ZERO_LAYOUTS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grad = torch.randn(40, 33, generator=torch.Generator().manual_seed(2)).to(device)
    grad[:3] = 0.0  # dead rows: exact zeros of the value
    grad[3, :4] = torch.tensor([2.0**-149, 2.0**-140, -(2.0**-130), 2.0**-90])  # squares underflow to 0
    hists = {}
    for kind in ("triton", "reference"):
        p = torch.zeros_like(grad, requires_grad=True)
        config = dict(info.backend_config)
        if info.name == "adabelief":
            config["eps"] = 0.0  # AdaBelief adds eps inside its histogrammed value: no zeros else
        opt = info.cls([p], bins=bins, **config)
        p.grad = grad.clone()
        with backend.use(kind):
            opt.step()
        assert {c.backend for c in opt.backends().values()} == {"triton" if kind == "triton" else "torch"}
        hists[kind] = opt.histogram(p)
    h = hists["reference"]
    assert h.zero_count >= 3 * 33 + 4, "the dead rows and underflowing squares are exact zeros on the reference"
    assert torch.equal(hists["triton"].counts, h.counts), (
        f"zero/below: {[hists['triton'].zero_count, hists['triton'].below_count]} vs {[h.zero_count, h.below_count]}"
    )
