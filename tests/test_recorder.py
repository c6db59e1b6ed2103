"""QuantileRecorder: per-tensor quantiles every k steps into a device buffer, read back once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fasthist
from fasthist.histogram import batched_quantile


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    return model, fasthist.Adam(model.named_parameters(), lr=1e-2)


def step(model, opt, g):
    opt.zero_grad()
    model(torch.randn(4, 5, generator=g)).pow(2).sum().backward()
    opt.step()


@pytest.mark.parametrize("every", [1, 3])
def test_records_the_rule_quantiles_every_k_steps(every):
    model, opt = setup()
    qs = [0.02, 0.5, 0.98]
    rec = fasthist.QuantileRecorder(opt, qs, every=every)
    g = torch.Generator().manual_seed(0)
    expected = []
    for i in range(1, 10):
        step(model, opt, g)
        if i % every == 0:
            counts = torch.stack([h.counts for h in opt.histograms().values()])
            q = batched_quantile(counts, torch.tensor(qs, dtype=torch.float64), opt.bins, exclude_zeros=True)
            expected.append(q.numpy())
    trace = rec.trace()
    assert trace.steps.tolist() == list(range(every, 10, every))
    assert trace.names == list(opt.histograms()) and trace.qs == qs
    assert np.allclose(trace.values, np.stack(expected), rtol=1e-6)  # float32 buffer
    # the 2%/98% points of the last record are the rule's per-tensor bounds
    if 9 % every == 0:
        rows = opt.eps_range().rows
        assert np.allclose(trace.values[-1][:, 0], [r.low for r in rows], rtol=1e-6)
        d = trace.to_dict()
        assert d["steps"] == trace.steps.tolist() and len(d["values"]) == len(trace.steps)


def test_ring_buffer_keeps_the_latest_in_order():
    model, opt = setup()
    rec = fasthist.QuantileRecorder(opt, [0.5], capacity=4)
    g = torch.Generator().manual_seed(0)
    medians = []
    for _ in range(10):
        step(model, opt, g)
        counts = torch.stack([h.counts for h in opt.histograms().values()])
        q = batched_quantile(counts, torch.tensor([0.5], dtype=torch.float64), opt.bins, exclude_zeros=True)
        medians.append(q[:, 0].numpy())
    trace = rec.trace()
    assert trace.steps.tolist() == [7, 8, 9, 10] and rec.dropped == 6
    assert np.allclose(trace.values[:, :, 0], np.stack(medians[-4:]), rtol=1e-6)


def test_manual_record_close_and_empty():
    model, opt = setup()
    rec = fasthist.QuantileRecorder(opt, every=1000)
    assert rec.trace().values.shape == (0, 0, 3)
    rec.record()  # nothing tracked yet: nothing recorded
    g = torch.Generator().manual_seed(0)
    step(model, opt, g)
    rec.record()
    rec.close()
    step(model, opt, g)
    trace = rec.trace()
    assert trace.steps.tolist() == [1] and trace.values.shape == (1, 4, 3)
    assert not math.isnan(trace.values[0, 0, 1])


def test_bad_arguments():
    model, opt = setup()
    with pytest.raises(TypeError):
        fasthist.QuantileRecorder(torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="every"):
        fasthist.QuantileRecorder(opt, every=0)
    with pytest.raises(ValueError, match="capacity"):
        fasthist.QuantileRecorder(opt, capacity=0)
    with pytest.raises(ValueError):
        fasthist.QuantileRecorder(opt, [1.5])
    with pytest.raises(ValueError, match="window"):
        fasthist.QuantileRecorder(opt, window="epoch")


def test_recorder_keeps_going_when_tensors_start_late():
    # a parameter with no gradient at first gets state (and a column) only later
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(torch.randn(30))
    opt = fasthist.Adam([a, b])
    rec = fasthist.QuantileRecorder(opt, [0.5], every=1)
    for i in range(4):
        opt.zero_grad()
        a.grad = torch.randn(50)
        if i >= 2:
            b.grad = torch.randn(30)
        opt.step()
    tr = rec.trace()
    assert tr.names == ["0.0", "0.1"]
    assert tr.values.shape == (4, 2, 1)
    assert np.isnan(tr.values[:2, 1, 0]).all() and np.isfinite(tr.values[2:, 1, 0]).all()
    _, _, counts = opt.histogram_rows("step")
    q = batched_quantile(counts, torch.tensor([0.5], dtype=torch.float64), opt.bins, exclude_zeros=True)
    np.testing.assert_allclose(tr.values[-1, :, 0], q[:, 0].numpy(), rtol=1e-6)
