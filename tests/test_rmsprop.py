"""fasthist.RMSprop against torch.optim.RMSprop, step for step, and its histograms against
the exact histogram of sqrt(v) (centered: sqrt(v - grad_avg**2)) read from the state."""

from __future__ import annotations

import copy

import pytest
import torch

import fasthist

STEPS = 60
# A matrix, a vector, an odd 3-d shape (no tensor is a multiple of a block), a 0-d scalar.
SHAPES = [(7, 5), (13,), (3, 4, 2), ()]


def make_params(seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def grads_at(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients spanning ~10 decades so the histograms fill many bins; some exact zeros."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in params:
        mag = 10.0 ** (torch.rand(p.shape, generator=g, dtype=torch.float64) * 10 - 7)
        gr = torch.randn(p.shape, generator=g, dtype=torch.float64) * mag
        if p.dim() == 2:
            gr[0] = 0.0  # a dead row: exact zeros in the state
        out.append(gr.to(p.dtype))
    return out


def sqrt_rn(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (the backends' ``sqrt_rn``): a float64 sqrt rounds
    to float32 without double-rounding error (53 >= 2*24 + 2 bits)."""
    return v.double().sqrt().float()


def denominator_value(state: dict, centered: bool) -> torch.Tensor:
    v = state["square_avg"]
    if centered:
        v = v.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
    return sqrt_rn(v)


CONFIGS = [
    {},
    {"centered": True},
    {"momentum": 0.9},
    {"centered": True, "momentum": 0.5},
    {"alpha": 0.9},
    {"weight_decay": 0.1},
    {"maximize": True},
    {"centered": True, "momentum": 0.9, "alpha": 0.95, "weight_decay": 1e-2, "maximize": True},
    {"foreach": True, "centered": True, "momentum": 0.9},
    {"foreach": False, "centered": True},
    {"lr": torch.tensor(3e-3)},
    {"eps": 1e-3, "lr": 0.1},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_torch_step_for_step(config):
    ours_p = make_params()
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = fasthist.RMSprop(ours_p, **copy.deepcopy(config))
    ref = torch.optim.RMSprop(ref_p, **copy.deepcopy(config))
    bins = ours.bins
    centered = config.get("centered", False)
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
            expected = bins.count(denominator_value(ours.state[p], centered))
            assert torch.equal(ours.histogram(p).counts, expected), f"step {step}, tensor {i}"
            total[i] += expected
    for p, t in zip(ours_p, total, strict=True):
        assert torch.equal(ours.histogram(p, window="total").counts, t)
        assert ours.histogram(p, window="total").count == STEPS * max(p.numel(), 1)


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
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    st = ours.state[p]
    v = torch.view_as_real(st["square_avg"]).addcmul(
        torch.view_as_real(st["grad_avg"]), torch.view_as_real(st["grad_avg"]), value=-1
    )
    assert torch.equal(ours.histogram(p).counts, fasthist.LogBins().count(sqrt_rn(v)))
    assert ours.histogram(p).count == 2 * p.numel()


def test_track_false_and_errors():
    a, b = torch.zeros(4, requires_grad=True), torch.zeros(5, requires_grad=True)
    opt = fasthist.RMSprop([{"params": [a]}, {"params": [b], "track": False}])
    a.grad, b.grad = torch.ones(4), torch.ones(5)
    opt.step()
    assert list(opt.histograms()) == ["0.0"]
    with pytest.raises(ValueError, match="Invalid alpha value"):
        fasthist.RMSprop([a], alpha=-1.0)
    with pytest.raises(ValueError, match="Invalid track value"):
        fasthist.RMSprop([a], track=1)


def test_state_dict_roundtrip_keeps_histograms_int64():
    params = make_params()
    opt = fasthist.RMSprop(params, centered=True, momentum=0.9)
    for step in range(5):
        for p, g in zip(params, grads_at(step, params), strict=True):
            p.grad = g
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = fasthist.RMSprop(params2, centered=True, momentum=0.9)
    opt2.load_state_dict(sd)
    for p, q in zip(params, params2, strict=True):
        assert opt2.state[q]["hist_total"].dtype == torch.int64
        assert opt2.histogram(q, window="total") == opt.histogram(p, window="total")


def check_estimate_pass(name: str, value_of) -> list:
    """``estimate_eps_range(optimizer=name)``: weights untouched bit for bit, and the per-tensor
    percentiles equal the sort-based rule on the exact value read from the pass's state."""
    from fasthist.estimate import eps_pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(6)]

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    opt = eps_pass(model, batches, loss_fn, optimizer=name, progress=False)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    rng = opt.eps_range()
    rel = opt.bins.relative_accuracy
    by_name = {r.name: r for r in rng.rows}
    for pname, p in model.named_parameters():
        a = value_of(opt.state[p], opt.param_groups[0]).reshape(-1)
        a = a[a != 0].sort().values
        n = a.numel()
        row = by_name[pname]
        assert row.nonzero == n
        for q, got in ((0.02, row.low), (0.98, row.high)):
            exact = float(a[min(int(q * n), n - 1)])
            assert abs(got - exact) <= rel * exact * (1 + 1e-9), (pname, q, got, exact)
    return rng.rows


@pytest.mark.parametrize("centered", [False, True])
def test_estimate_eps_range_with_rmsprop(centered):
    check_estimate_pass(
        "rmsprop-centered" if centered else "rmsprop", lambda st, group: denominator_value(st, group["centered"])
    )
