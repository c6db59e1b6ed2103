"""fasthist.AdaBelief against adabelief_pytorch.AdaBelief (the reference implementation),
step for step over its options, and its histograms against the exact histogram of
(1-beta2) * s_hat read from the state."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from test_rmsprop import STEPS, check_estimate_pass, grads_at, make_params

import fasthist

adabelief_pytorch = pytest.importorskip("adabelief_pytorch")


def reference(params, **kw):
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its change log
        return adabelief_pytorch.AdaBelief(params, print_change_log=False, **kw)


def expected_value(opt, p, group) -> torch.Tensor:
    st = opt.state[p]
    _, beta2 = group["betas"]
    t = int(st["step"])
    v = st["max_exp_avg_var"] if group["amsgrad"] and not group["rectify"] else st["exp_avg_var"]
    c = torch.tensor((1 - beta2**t) / (1 - beta2), dtype=torch.float32)
    return v.float() / c


CONFIGS = [
    {},  # the package's defaults: eps=1e-16, decoupled decay, rectified
    {"weight_decay": 1e-2},
    {"weight_decay": 1e-2, "fixed_decay": True},
    {"weight_decay": 1e-2, "weight_decouple": False},
    {"rectify": False},
    {"rectify": False, "amsgrad": True},
    {"amsgrad": True},  # rectified updates ignore the max (as the package does)
    {"degenerated_to_sgd": False},
    {"eps": 1e-8, "betas": (0.8, 0.99), "lr": 1e-2},
    {"betas": (0.9, 0.9)},  # short warm-up: rho_t >= 5 from step ~7 on
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_adabelief_pytorch_step_for_step(config):
    ours_p = make_params()
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = fasthist.AdaBelief(ours_p, **config)
    ref = reference(ref_p, **config)
    group = ours.param_groups[0]
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
            assert int(ours.state[p]["step"]) == ref.state[q]["step"] == step + 1
            for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
                if key in ref.state[q]:
                    torch.testing.assert_close(ours.state[p][key], ref.state[q][key], rtol=1e-6, atol=0.0)
            expected = bins.count(expected_value(ours, p, group))
            assert torch.equal(ours.histogram(p).counts, expected), f"step {step}, tensor {i}"
            total[i] += expected
    for p, t in zip(ours_p, total, strict=True):
        assert torch.equal(ours.histogram(p, window="total").counts, t)


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
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(ours.state[p]["exp_avg_var"], ref.state[q]["exp_avg_var"], rtol=1e-6, atol=0)
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


def test_errors():
    a = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        fasthist.AdaBelief([a], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid epsilon value"):
        fasthist.AdaBelief([a], eps=-1.0)
    a.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fasthist.AdaBelief([a]).step()


def test_estimate_eps_range_with_adabelief():
    def value(st, group):
        _, beta2 = group["betas"]
        t = int(st["step"])
        return st["exp_avg_var"] / torch.tensor((1 - beta2**t) / (1 - beta2), dtype=torch.float32)

    check_estimate_pass("adabelief", value)


def test_lr_zero_leaves_params_alone_even_with_eps_zero():
    p = torch.tensor([0.5, -0.0, 2.0], requires_grad=True)
    opt = fasthist.AdaBelief([p], lr=0.0, eps=0.0)
    for _ in range(8):  # through the SGD warm-up and into the rectified updates
        p.grad = torch.tensor([1.0, 0.0, 0.0])  # elements 1 and 2: s = 0, m = 0
        opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.5, -0.0, 2.0]))
    assert torch.signbit(p.detach()[1])
    assert opt.histogram(p).zero_count == 2
