"""Staleness helpers against exact computations: the bound of Adam's staleness, and the RMS
read off a LogBins histogram against the RMS of the elements."""

from __future__ import annotations

import math

import pytest
import torch

from fasthist import LogBins
from fasthist.health import rms_from_counts, staleness_bound

LAYOUTS = [LogBins(), LogBins(-20, 10, 3), LogBins(-126, 128, 7)]


@pytest.mark.parametrize("beta2", [0.9, 0.95, 0.999])
def test_adam_staleness_never_exceeds_the_bound(beta2):
    """torch's Adam state after steps of wild gradients: every |g| / sqrt(v_hat) <= B(β2, t)
    (B from exact arithmetic; the float32 state rounds, hence 1e-5 relative slack)."""
    g = torch.Generator().manual_seed(0)
    p = torch.zeros(10_000, requires_grad=True)
    opt = torch.optim.Adam([p], betas=(0.9, beta2), eps=0.0)
    for t in range(1, 60):
        p.grad = torch.randn(10_000, generator=g) * 10.0 ** torch.randint(-6, 6, (10_000,), generator=g)
        opt.step()
        vhat = opt.state[p]["exp_avg_sq"] / (1 - beta2**t)
        s = p.grad.abs() / vhat.sqrt()
        bound = staleness_bound(beta2, t)
        assert s.max().item() <= bound * (1 + 1e-5), (t, s.max().item(), bound)
    assert s.max().item() > 0.5 * bound, "some element comes close: the bound is tight, not loose"


def test_bound_values_and_errors():
    assert staleness_bound(0.999, 1) == pytest.approx(1.0)
    assert staleness_bound(0.999, 1e9) == pytest.approx(math.sqrt(1000), rel=1e-12)
    assert staleness_bound(0.95, 10_000) == pytest.approx(math.sqrt(20), rel=1e-12)
    assert staleness_bound(0.0, 7) == 1.0
    with pytest.raises(ValueError, match="Invalid beta2"):
        staleness_bound(1.0, 3)
    with pytest.raises(ValueError, match="Invalid step"):
        staleness_bound(0.9, 0)


@pytest.mark.parametrize("bins", LAYOUTS, ids=repr)
def test_rms_from_counts_within_its_stated_error(bins):
    """Rows spanning many decades, with exact zeros: the true RMS (float64, of the float32
    values) lies in [lower, upper], and the estimate is within 2^-(m+1) of it."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for spread in (0, 1, 4, 8):
        x = (torch.randn(5000, generator=g, dtype=torch.float64) * 10.0 ** (spread * torch.rand(5000, generator=g)))
        x = x.clamp(-bins.high / 2, bins.high / 2).abs().clamp_min(bins.low).to(torch.float32)
        x[:100] = 0.0
        rows.append(x)
    counts = torch.stack([bins.count(x) for x in rows])
    est = rms_from_counts(counts, bins)
    true = torch.stack([x.double().square().mean().sqrt() for x in rows])
    assert torch.all(est.lower <= true) and torch.all(true <= est.upper), (est, true)
    rel = ((est.estimate - true).abs() / true).max().item()
    assert rel < 2.0 ** -(bins.mantissa_bits + 1), rel


def test_rms_from_counts_special_bins():
    bins = LogBins()
    x = torch.tensor([0.0, 0.0, 1.0, 1.0])
    est = rms_from_counts(bins.count(x), bins)
    assert est.lower.item() == pytest.approx(math.sqrt(0.5), rel=1e-12)  # 1.0 is a bin's lower edge
    assert torch.isnan(rms_from_counts(torch.zeros(bins.num_bins, dtype=torch.int64), bins).estimate)
    below = rms_from_counts(bins.count(torch.tensor([bins.low / 4])), bins)
    assert below.lower.item() == 0.0 and below.upper.item() == pytest.approx(bins.low)
    assert rms_from_counts(bins.count(torch.tensor([1.0, bins.high * 2])), bins).upper.item() == math.inf
    assert torch.isnan(rms_from_counts(bins.count(torch.tensor([1.0, math.nan])), bins).estimate)
    with pytest.raises(ValueError, match="Invalid counts"):
        rms_from_counts(torch.zeros(3, dtype=torch.int64), bins)
    with pytest.raises(TypeError, match="integer counts"):
        rms_from_counts(torch.zeros(bins.num_bins), bins)
