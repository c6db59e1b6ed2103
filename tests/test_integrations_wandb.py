"""fasthist.integrations.wandb: the merge to W&B's 512 buckets (exact against coarser
LogBins), and a real offline W&B run read back from its .wandb file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fasthist
from fasthist.integrations.wandb import MAX_BUCKETS, log_histograms, wandb_buckets
from tests._integration_helpers import (
    Tiny,
    data,
    expected_staleness,
    name_eps,
    optimizer,
    staleness_optimizer,
    wandb_history,
)


def counts_of(values, bins):
    return fasthist.Histogram.from_values(torch.tensor(values, dtype=torch.float32), bins).counts.numpy()


# values spanning: exact zeros, below range, many decades, above range, non-finite
SPREAD = [0.0, 0.0, 1e-30, 3e-18, 1e-12, 2e-9, 5e-6, 1e-3, 0.7, 40.0, 1e3, 1e5, math.inf, math.nan]


@pytest.mark.parametrize("scale", ["linear", "log10"])
def test_merged_buckets_are_coarser_logbins_exactly(scale):
    bins = fasthist.LogBins()  # 2,592 log bins
    c = counts_of(SPREAD, bins)
    counts, edges = wandb_buckets(c, bins, scale)
    assert len(counts) <= MAX_BUCKETS and len(edges) == len(counts) + 1
    assert counts.sum() == len(SPREAD)  # every element counted once, non-finite included
    assert np.all(np.diff(edges) > 0)
    assert counts[0] == 3 and counts[-1] == 3  # zeros + below; above + inf + nan
    # the log part is the histogram of the same values under LogBins with fewer mantissa
    # bits: same counts, same edges (never re-sampled)
    for j in range(bins.mantissa_bits + 1):
        coarse = fasthist.LogBins(bins.min_exponent, bins.max_exponent, bins.mantissa_bits - j)
        if coarse.num_log_bins <= MAX_BUCKETS - 2 or j == bins.mantissa_bits:
            break
    cc = counts_of(SPREAD, coarse)[coarse.FIRST_LOG : coarse.above]
    nz = np.nonzero(cc)[0]
    ce = coarse.edges.numpy()[nz[0] : nz[-1] + 2]
    assert counts[1:-1].tolist() == cc[nz[0] : nz[-1] + 1].tolist()
    np.testing.assert_array_equal(edges[1:-1], np.log10(ce) if scale == "log10" else ce)


def test_narrow_histograms_keep_full_resolution():
    bins = fasthist.LogBins()
    c = counts_of([1e-3, 1.1e-3, 2e-3, 0.5], bins)  # 9 binades: 288 log bins fit
    counts, edges = wandb_buckets(c, bins)
    full = bins.edges.numpy()
    assert np.isin(edges, full).all() and counts.sum() == 4 and len(counts) > 256


def test_explicit_buckets_only():
    bins = fasthist.LogBins()
    c = counts_of([0.0, 1e-30, 1e9, math.nan], bins)  # nothing in a log bin
    counts, edges = wandb_buckets(c, bins)
    assert counts.tolist() == [2, 0, 2] and edges.tolist()[1:3] == [bins.low, bins.high]
    counts, edges = wandb_buckets(counts_of([0.0], bins), bins, "log10")
    assert counts.tolist() == [1] and edges.tolist() == [math.log10(bins.low) - 1, math.log10(bins.low)]
    with pytest.raises(ValueError, match="Invalid scale"):
        wandb_buckets(c, bins, "ln")


def _offline_and_stepped(monkeypatch, make_optimizer):
    """W&B in offline mode; a Tiny model's optimizer from ``make_optimizer``, stepped twice."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = Tiny()
    opt = make_optimizer(model)
    x, y = data(16)
    for i in range(2):
        opt.zero_grad()
        model(x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8])["loss"].backward()
        opt.step()
    return wandb, opt


def test_offline_run_read_back(tmp_path, monkeypatch):
    wandb, opt = _offline_and_stepped(monkeypatch, optimizer)
    run = wandb.init(project="fasthist-test", dir=str(tmp_path), mode="offline")
    logged = log_histograms(run, opt, 7)
    run.finish()
    (entry,) = wandb_history(tmp_path)
    assert entry["_step"] == 7
    rng, eps = opt.eps_range(), name_eps(opt)
    for name, h in opt.histograms().items():
        values, edges = entry[f"fasthist/{name}/values"], entry[f"fasthist/{name}/bins"]
        assert entry[f"fasthist/{name}/_type"] == "histogram"
        assert sum(values) == h.count and len(edges) == len(values) + 1
        if h.zero_count:  # zeros (with below-range values) in a bucket [0, first log edge kept)
            assert values[0] == h.zero_count + h.below_count and edges[0] == 0.0
        row = next(r for r in rng.rows if r.name == name)
        assert entry[f"fasthist.p02/{name}"] == row.low == logged[name]["p02"]
        assert entry[f"fasthist.p98/{name}"] == row.high
        assert entry[f"fasthist.adaptive/{name}"] == h.fraction_above(eps[name])
    assert entry["fasthist.adaptive/net.0.weight"] < 1.0


def test_offline_run_gets_staleness(tmp_path, monkeypatch):
    """log_histograms with staleness tracked: its histograms and its per-tensor RMS and p99."""
    wandb, opt = _offline_and_stepped(monkeypatch, staleness_optimizer)
    want = expected_staleness(opt)
    run = wandb.init(project="fasthist-test", dir=str(tmp_path), mode="offline")
    logged = log_histograms(run, opt, 3)
    run.finish()
    (entry,) = wandb_history(tmp_path)
    for name, h in opt.histograms(quantity="staleness").items():
        assert sum(entry[f"fasthist.staleness/{name}/values"]) == h.count
        for k in ("staleness_rms", "staleness_p99"):
            assert entry[f"fasthist.{k}/{name}"] == want[f"fasthist.{k}/{name}"] == logged[name][k]
