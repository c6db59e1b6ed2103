"""What is particular to fasthist.RMSprop: the centered value, complex parameters. Step-for-step
equality with torch.optim.RMSprop, state dicts, bad input and the ε-range pass are in
test_contract.py (the table in _optim_db.py)."""

from __future__ import annotations

import torch
from _optim_db import sqrt_rn

import fasthist


def test_centered_value_is_what_torch_adds_eps_to():
    """The histogram must see sqrt(v - grad_avg**2), not sqrt(v): with a constant gradient
    the centered value sqrt(alpha**t * (1 - alpha**t)) * |g| collapses to ~1e-5 while
    sqrt(v) approaches |g|."""
    p = torch.ones(1000, requires_grad=True)
    opt = fasthist.RMSprop([p], centered=True, alpha=0.5)
    for _ in range(30):
        p.grad = torch.full_like(p, 0.5)
        opt.step()
    plain = fasthist.LogBins().count(sqrt_rn(opt.state[p]["square_avg"]))
    h = opt.histogram(p)
    assert not torch.equal(h.counts, plain)
    assert h.quantile(0.5) < 1e-3
    assert fasthist.Histogram(plain, h.bins).quantile(0.5) > 0.45


def test_complex_params_histogram_real_and_imaginary_parts():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(6, 3, dtype=torch.complex64, generator=g, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, ref = (
        fasthist.RMSprop([p], centered=True, momentum=0.9),
        torch.optim.RMSprop([q], centered=True, momentum=0.9),
    )
    for _ in range(10):
        grad = torch.randn(6, 3, dtype=torch.complex64, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert torch.equal(p, q)  # the reference backend is torch's rmsprop
    st = ours.state[p]
    v = torch.view_as_real(st["square_avg"]).addcmul(
        torch.view_as_real(st["grad_avg"]), torch.view_as_real(st["grad_avg"]), value=-1
    )
    assert torch.equal(ours.histogram(p).counts, fasthist.LogBins().count(sqrt_rn(v)))
    assert ours.histogram(p).count == 2 * p.numel()
