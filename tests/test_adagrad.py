"""What is particular to fasthist.Adagrad: sparse gradients, the fused found_inf protocol,
complex parameters. Step-for-step equality with torch.optim.Adagrad, state dicts, bad input
and the ε-range pass are in test_contract.py (the table in _optim_db.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from _optim_db import grads_at, make_params, sqrt_rn

import fasthist


def test_sparse_gradients_histogram_the_whole_accumulator():
    emb = torch.nn.Embedding(50, 4, sparse=True)
    ref = copy.deepcopy(emb)
    ours_opt = fasthist.Adagrad(emb.parameters(), lr=0.1, initial_accumulator_value=1e-6)
    ref_opt = torch.optim.Adagrad(ref.parameters(), lr=0.1, initial_accumulator_value=1e-6)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = torch.randint(0, 50, (8,), generator=g)
        for m, opt in ((emb, ours_opt), (ref, ref_opt)):
            opt.zero_grad()
            m(idx).pow(2).sum().backward()
            assert m.weight.grad.is_sparse
            opt.step()
    assert torch.equal(emb.weight, ref.weight)  # the reference backend is torch's adagrad
    h = ours_opt.histogram(emb.weight)
    assert h.count == emb.weight.numel()
    assert torch.equal(h.counts, fasthist.LogBins().count(sqrt_rn(ours_opt.state[emb.weight]["sum"])))
    # untouched rows stay at sqrt(initial_accumulator_value) = 1e-3
    assert h.quantile(0.0) == pytest.approx(1e-3, rel=h.relative_accuracy)


def test_fused_found_inf_skips_step_and_histograms():
    """The fused/GradScaler protocol: a step with found_inf set changes nothing at all."""
    params = make_params()
    opt = fasthist.Adagrad(params, fused=True)
    for p, g in zip(params, grads_at(0, params), strict=True):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in params]
    hist_before = {k: v.counts.clone() for k, v in opt.histograms(window="total").items()}
    step_before = {k: v.counts.clone() for k, v in opt.histograms().items()}
    opt.grad_scale = torch.tensor(1.0)
    opt.found_inf = torch.tensor(1.0)
    for p, g in zip(params, grads_at(1, params), strict=True):
        p.grad = g
    opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)
    for k, h in opt.histograms(window="total").items():
        assert torch.equal(h.counts, hist_before[k])
    for k, h in opt.histograms().items():
        assert torch.equal(h.counts, step_before[k])
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(params[0].detach(), before[0])
    assert opt.histogram(params[0], window="total").count == 2 * params[0].numel()


def test_complex_params():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(6, 3, dtype=torch.complex64, generator=g, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, ref = fasthist.Adagrad([p], lr_decay=0.01), torch.optim.Adagrad([q], lr_decay=0.01)
    for _ in range(10):
        grad = torch.randn(6, 3, dtype=torch.complex64, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert torch.equal(p, q)
    expected = fasthist.LogBins().count(sqrt_rn(torch.view_as_real(ours.state[p]["sum"])))
    assert torch.equal(ours.histogram(p).counts, expected)
