"""fasthist.Adagrad against torch.optim.Adagrad, step for step, and its histograms against
the exact histogram of sqrt(sum) read from the state."""

from __future__ import annotations

import copy

import pytest
import torch
from test_rmsprop import STEPS, check_estimate_pass, grads_at, make_params, sqrt_rn

import fasthist

CONFIGS = [
    {},
    {"lr_decay": 0.05},
    {"weight_decay": 0.1},
    {"initial_accumulator_value": 0.1},
    {"eps": 1e-3, "lr": 0.1},
    {"maximize": True},
    {"lr_decay": 1e-2, "weight_decay": 1e-2, "initial_accumulator_value": 1e-4, "maximize": True},
    {"foreach": True, "lr_decay": 1e-2},
    {"foreach": False, "weight_decay": 1e-2},
    {"fused": True, "lr_decay": 1e-2, "initial_accumulator_value": 1e-3},
    {"lr": torch.tensor(3e-2)},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_torch_step_for_step(config):
    ours_p = make_params()
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = fasthist.Adagrad(ours_p, **copy.deepcopy(config))
    ref = torch.optim.Adagrad(ref_p, **copy.deepcopy(config))
    bins = ours.bins
    total = [torch.zeros(bins.num_bins, dtype=torch.int64) for _ in ours_p]
    for step in range(STEPS):
        for p, q, g in zip(ours_p, ref_p, grads_at(step, ours_p), strict=True):
            p.grad = g.clone()
            q.grad = g.clone()
        ours.step()
        ref.step()
        for i, (p, q) in enumerate(zip(ours_p, ref_p, strict=True)):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            for key, value in ref.state[q].items():
                torch.testing.assert_close(ours.state[p][key], value, rtol=1e-6, atol=1e-7)
            expected = bins.count(sqrt_rn(ours.state[p]["sum"]))
            assert torch.equal(ours.histogram(p).counts, expected), f"step {step}, tensor {i}"
            total[i] += expected
    for p, t in zip(ours_p, total, strict=True):
        assert torch.equal(ours.histogram(p, window="total").counts, t)


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
    torch.testing.assert_close(emb.weight, ref.weight, rtol=1e-6, atol=1e-7)
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
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    expected = fasthist.LogBins().count(sqrt_rn(torch.view_as_real(ours.state[p]["sum"])))
    assert torch.equal(ours.histogram(p).counts, expected)


def test_errors():
    a = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid lr_decay value"):
        fasthist.Adagrad([a], lr_decay=-1.0)
    with pytest.raises(TypeError, match="bins must be a fasthist.LogBins"):
        fasthist.Adagrad([a], bins=5)


def test_estimate_eps_range_with_adagrad():
    check_estimate_pass("adagrad", lambda st, group: sqrt_rn(st["sum"]))
