"""What is particular to fasthist.AdaBelief: float16 parameters stepped in float32 like the
package, the floor at eps, lr=0 with eps=0. Step-for-step equality with
adabelief_pytorch.AdaBelief (the reference implementation), state dicts, bad input and the
ε-range pass are in test_contract.py (the table in _optim_db.py)."""

from __future__ import annotations

import pytest
import torch
from _optim_db import adabelief_package as reference
from _optim_db import grads_at, make_params

import fasthist

pytest.importorskip("adabelief_pytorch")


def test_float16_params_step_in_float32_like_the_package():
    ours_p = make_params(dtype=torch.float16)
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours, ref = fasthist.AdaBelief(ours_p, rectify=False), reference(ref_p, rectify=False)
    for step in range(20):
        for p, q, g in zip(ours_p, ref_p, grads_at(step, ours_p), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p, strict=True):
        assert p.dtype == torch.float16
        assert ours.state[p]["exp_avg_var"].dtype == torch.float32
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["exp_avg_var"], ref.state[q]["exp_avg_var"])
    # fp32 moments survive a state_dict round trip (torch would cast them to fp16)
    ours2 = fasthist.AdaBelief([p.detach().clone().requires_grad_() for p in ours_p], rectify=False)
    ours2.load_state_dict(ours.state_dict())
    p2 = ours2.param_groups[0]["params"][0]
    assert ours2.state[p2]["exp_avg_var"].dtype == torch.float32
    assert torch.equal(ours2.state[p2]["exp_avg_var"], ours.state[ours_p[0]]["exp_avg_var"])


def test_floor_at_eps():
    """(1-beta2)*s_hat = (1-beta2)*EMA_hat(r**2) + eps: with zero gradients every element
    sits at eps (up to rounding), i.e. in eps's bin; with large gradients far above."""
    eps = 1e-8
    p = torch.zeros(1000, requires_grad=True)
    opt = fasthist.AdaBelief([p], eps=eps)
    for _ in range(10):
        p.grad = torch.zeros(1000)
        opt.step()
    h = opt.histogram(p)
    assert h.quantile(0.0) == pytest.approx(eps, rel=2 * h.relative_accuracy)
    assert h.quantile(1.0) == pytest.approx(eps, rel=2 * h.relative_accuracy)
    p.grad = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    opt.step()
    assert opt.histogram(p).quantile(0.5) > 1e3 * eps


def test_lr_zero_leaves_params_alone_even_with_eps_zero():
    p = torch.tensor([0.5, -0.0, 2.0], requires_grad=True)
    opt = fasthist.AdaBelief([p], lr=0.0, eps=0.0)
    for _ in range(8):  # through the SGD warm-up and into the rectified updates
        p.grad = torch.tensor([1.0, 0.0, 0.0])  # elements 1 and 2: s = 0, m = 0
        opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, -0.0, 2.0]))
    assert torch.signbit(p.detach()[1])
    assert opt.histogram(p).zero_count == 2
