"""log_histograms writes real TensorBoard event files; read them back with tensorboard's
own event reader and check them against the optimizer's histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fasthist
from fasthist.histogram import batched_quantile
from fasthist.integrations.tensorboard import log_histograms

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


def trained(steps: int = 3):
    """A model with dead hidden units (exact zeros in sqrt(v_hat)) and two param groups
    with different eps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias[:4] = -50.0
    names = dict(model.named_parameters())
    opt = fasthist.Adam(
        [
            {"params": [names["0.weight"], names["0.bias"]], "param_names": ["0.weight", "0.bias"], "eps": 1e-3},
            {"params": [names["2.weight"], names["2.bias"]], "param_names": ["2.weight", "2.bias"]},
        ],
        lr=1e-2,
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 6, generator=g)), torch.randint(0, 3, (8,), generator=g)).backward()
        opt.step()
    return model, opt


def read(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    return ea


@pytest.mark.parametrize("scale", ["linear", "log10"])
def test_histograms_read_back(tmp_path, scale):
    model, opt = trained()
    with SummaryWriter(str(tmp_path)) as writer:
        for step in (10, 20):
            log_histograms(writer, opt, step, scale=scale)
    ea = read(tmp_path)
    hists = opt.histograms()
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert sorted(ea.Tags()["histograms"]) == sorted(f"fasthist/{n}" for n in sizes)
    for name, size in sizes.items():
        events = ea.Histograms(f"fasthist/{name}")
        assert [e.step for e in events] == [10, 20]
        h = events[-1].histogram_value
        limits, counts = np.array(h.bucket_limit), np.array(h.bucket)
        assert counts.sum() == size and h.num == size  # every element counted once
        assert np.all(np.diff(limits) > 0)  # edges increasing
        assert h.min <= limits[0] and h.max == limits[-1]
        # no re-binning: the nonzero counts are the optimizer's own bin counts, in order
        c = hists[name].counts.numpy()
        if scale == "linear":
            assert counts[counts > 0].tolist() == c[c > 0].astype(float).tolist()
            log_edges = hists[name].bins.edges.numpy()
            inner = [x for x in limits if 0 < x < np.finfo(np.float64).max and x != hists[name].bins.low]
            assert np.isin(inner, log_edges).all()  # the real bin edges
        else:
            assert np.all(np.isfinite(limits))


def test_zero_bucket_holds_the_exact_zeros(tmp_path):
    _, opt = trained()
    h = opt.histograms()["0.weight"]
    assert h.zero_count == 4 * 6  # the dead units' rows
    with SummaryWriter(str(tmp_path)) as writer:
        log_histograms(writer, opt, 1, scalars=False)
    ev = read(tmp_path).Histograms("fasthist/0.weight")[0].histogram_value
    assert ev.bucket_limit[0] == 0.0 and ev.bucket[0] == h.zero_count and ev.min == 0.0


def test_scalars(tmp_path):
    _, opt = trained()
    with SummaryWriter(str(tmp_path)) as writer:
        logged = log_histograms(writer, opt, 5)
    ea = read(tmp_path)
    names, counts = list(opt.histograms()), torch.stack([h.counts for h in opt.histograms().values()])
    q = batched_quantile(counts, torch.tensor([0.02, 0.5, 0.98], dtype=torch.float64), opt.bins, exclude_zeros=True)
    eps_of = {"0.weight": 1e-3, "0.bias": 1e-3, "2.weight": 1e-8, "2.bias": 1e-8}
    rng = opt.eps_range()
    for i, name in enumerate(names):
        for j, key in enumerate(("p02", "p50", "p98")):
            (ev,) = ea.Scalars(f"fasthist.{key}/{name}")
            assert ev.step == 5 and math.isclose(ev.value, float(q[i, j]), rel_tol=1e-6)
        # p2/p98 are the rule's per-tensor bounds
        row = next(r for r in rng.rows if r.name == name)
        assert logged[name]["p02"] == row.low and logged[name]["p98"] == row.high
        (ev,) = ea.Scalars(f"fasthist.adaptive/{name}")
        want = opt.histograms()[name].fraction_above(eps_of[name])
        assert math.isclose(ev.value, want, rel_tol=1e-6) and logged[name]["adaptive"] == want
    assert logged["0.weight"]["adaptive"] < 1.0  # the zeros are not adaptive


def test_bad_arguments(tmp_path):
    _, opt = trained(1)
    with SummaryWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError, match="Invalid scale"):
            log_histograms(writer, opt, 0, scale="ln")
        with pytest.raises(TypeError, match="fasthist optimizer"):
            log_histograms(writer, torch.optim.Adam(nn.Linear(2, 2).parameters()), 0)
        with pytest.raises(ValueError, match="Invalid window"):
            log_histograms(writer, opt, 0, window="epoch")
