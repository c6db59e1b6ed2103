"""estimate_eps_range against a direct, sort-based implementation of the paper's rule.

The reference runs a plain ``torch.optim.Adam`` at lr=0 over the same batches (with the
same clipping and coupled weight decay), takes ``sqrt(v / (1 - beta2**n))`` per tensor,
drops exact zeros, sorts, reads ``a[min(floor(q*n), n-1)]``, takes the envelope and
rounds to decades. The histogram-based answer must agree except where it says
``ambiguous``; per-tensor percentiles must agree within the bins' relative accuracy and
zero counts exactly.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fasthist
from fasthist.estimate import eps_optimizers, eps_pass, grid_inside, register_eps_optimizer

REL = fasthist.LogBins().relative_accuracy


# -- the reference: a plain torch Adam run and numpy sorting ----------------------------
def rule_by_sort(model, batches, loss_fn, *, betas=(0.9, 0.999), weight_decay=0.0, clip=None, low=0.02, high=0.98):
    model = copy.deepcopy(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.Adam(params, lr=0.0, betas=betas, weight_decay=weight_decay)
    n_steps = 0
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        n_steps += 1
    rows = {}
    for name, p in named:
        if p not in opt.state:
            continue
        v = opt.state[p]["exp_avg_sq"].double().numpy().reshape(-1)
        x = np.sqrt(v / (1 - betas[1] ** n_steps))
        a = np.sort(x[x != 0])
        if len(a) == 0:
            rows[name] = (x.size, 0, math.nan, math.nan)
            continue
        k_lo = min(math.floor(low * len(a)), len(a) - 1)
        k_hi = min(math.floor(high * len(a)), len(a) - 1)
        rows[name] = (x.size, len(a), a[k_lo], a[k_hi])
    lows = [r[2] for r in rows.values() if r[1]]
    highs = [r[3] for r in rows.values() if r[1]]
    lo_raw, hi_raw = min(lows), max(highs)
    lo, hi = 10.0 ** round(math.log10(lo_raw)), 10.0 ** round(math.log10(hi_raw))
    cands = [10.0**e for e in range(round(math.log10(lo)), round(math.log10(hi)) + 1)]
    return rows, lo_raw, hi_raw, lo, hi, cands


def assert_agrees(res: fasthist.EpsRange, ref) -> None:
    rows, lo_raw, hi_raw, lo, hi, cands = ref
    got = {r.name: r for r in res.rows}
    assert set(got) == set(rows)
    for name, (numel, nonzero, p_lo, p_hi) in rows.items():
        r = got[name]
        assert (r.numel, r.nonzero) == (numel, nonzero), name
        if nonzero:
            assert abs(r.low - p_lo) <= REL * p_lo * (1 + 1e-9), (name, r.low, p_lo)
            assert abs(r.high - p_hi) <= REL * p_hi * (1 + 1e-9), (name, r.high, p_hi)
    assert abs(res.low_raw - lo_raw) <= REL * lo_raw * (1 + 1e-9)
    assert abs(res.high_raw - hi_raw) <= REL * hi_raw * (1 + 1e-9)
    if (res.low, res.high) != (lo, hi):
        assert res.ambiguous, (res, lo, hi)
    if not res.ambiguous:
        assert res.low == lo and res.high == hi
        assert res.candidates == cands


# -- small models where zeros matter -----------------------------------------------------
class DeadMLP(nn.Module):
    """A quarter of the hidden units can never fire (bias -100 on inputs of size ~1), so
    their rows of fc1 and their columns of fc2 get exactly zero gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 4)
        with torch.no_grad():
            self.fc1.bias[:8] = -100.0

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class EmbedBag(nn.Module):
    """An embedding of 64 rows of which the batches only ever use the first 40."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(dim=1))


class ConvBN(nn.Module):
    """Conv + BatchNorm (its running statistics are buffers that must come back) + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def make(kind: str, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    if kind == "dead_mlp":
        model = DeadMLP()
        batches = [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(7)]
    elif kind == "embedding":
        model = EmbedBag()
        batches = [
            (torch.randint(0, 40, (16, 6), generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(7)
        ]
    elif kind == "convbn":
        model = ConvBN()
        batches = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]
    else:
        raise AssertionError(kind)
    return model, batches


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.view(torch.int32) if v.dtype == torch.float32 else v).clone() for k, v in model.state_dict().items()}


# -- agreement with the sort-based rule ---------------------------------------------------
@pytest.mark.parametrize("kind", ["dead_mlp", "embedding", "convbn"])
@pytest.mark.parametrize("seed", range(4))
def test_rule_matches_sort(kind, seed):
    model, batches = make(kind, seed)
    res = fasthist.estimate_eps_range(model, batches, ce, progress=False)
    ref = rule_by_sort(model, batches, ce)
    assert_agrees(res, ref)
    if kind in ("dead_mlp", "embedding"):
        # the zeros are there, and were dropped
        assert any(r.nonzero < r.numel for r in res.rows)


@pytest.mark.parametrize("kind", ["dead_mlp", "embedding"])
def test_coupled_weight_decay_and_clipping(kind):
    model, batches = make(kind, 7)
    res = fasthist.estimate_eps_range(model, batches, ce, weight_decay=0.05, clip_grad_norm=0.1, progress=False)
    ref = rule_by_sort(model, batches, ce, weight_decay=0.05, clip=0.1)
    assert_agrees(res, ref)
    # coupled decay reaches the dead rows: wd * theta is not zero there
    plain = fasthist.estimate_eps_range(model, batches, ce, progress=False)
    assert sum(r.nonzero for r in res.rows) > sum(r.nonzero for r in plain.rows)


def test_adamw_decay_does_not_enter_the_moments():
    model, batches = make("dead_mlp", 3)
    res = fasthist.estimate_eps_range(model, batches, ce, optimizer="adamw", weight_decay=0.1, progress=False)
    assert_agrees(res, rule_by_sort(model, batches, ce))


def test_betas_and_percentiles():
    model, batches = make("embedding", 2)
    res = fasthist.estimate_eps_range(model, batches, ce, betas=(0.5, 0.9), low=0.1, high=0.9, progress=False)
    assert_agrees(res, rule_by_sort(model, batches, ce, betas=(0.5, 0.9), low=0.1, high=0.9))


def test_steps_caps_the_pass():
    model, batches = make("dead_mlp", 1)
    it = iter(batches)
    res = fasthist.estimate_eps_range(model, it, ce, steps=3, progress=False)
    assert_agrees(res, rule_by_sort(model, batches[:3], ce))
    assert next(it) is batches[3]  # no batch fetched past the cap


def test_on_an_embedded_task():
    pytest.importorskip("sklearn")
    from fasthist.tasks import get_task

    task = get_task("digits", seed=0)
    batches = task.batches(0)[:6]
    model = task.model()
    res = fasthist.estimate_eps_range(model, batches, task.loss, progress=False)
    assert_agrees(res, rule_by_sort(model, batches, task.loss))


# -- the flag: a raw bound on a rounding boundary -----------------------------------------
class Fixed(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))


def linear_loss(c: torch.Tensor):
    # gradient = c exactly, so after one step sqrt(v_hat) = |c| up to rounding
    return lambda model, batch: (model.w * c).sum()


@pytest.mark.parametrize("rel_offset", [-0.004, 0.0, 0.004])
def test_ambiguous_near_boundary(rel_offset):
    boundary = 10.0**-3.5
    c = torch.full((100,), boundary * (1 + rel_offset))
    res = fasthist.estimate_eps_range(Fixed(100), [None], linear_loss(c), progress=False)
    assert res.ambiguous
    ref = rule_by_sort(Fixed(100), [None], linear_loss(c))
    assert_agrees(res, ref)


def test_not_ambiguous_away_from_boundary():
    c = torch.linspace(1e-4, 2e-4, 100)
    res = fasthist.estimate_eps_range(Fixed(100), [None], linear_loss(c), progress=False)
    assert not res.ambiguous
    assert (res.low, res.high, res.candidates) == (1e-4, 1e-4, [1e-4])


# -- weights, buffers and grads are left alone --------------------------------------------
@pytest.mark.parametrize("kind", ["dead_mlp", "embedding", "convbn"])
def test_weights_and_buffers_bit_identical(kind):
    model, batches = make(kind, 5)
    with torch.no_grad():  # signed zeros must survive too
        next(model.parameters()).view(-1)[:2] = torch.tensor([0.0, -0.0])
    before = bits(model)
    fasthist.estimate_eps_range(model, batches, ce, weight_decay=0.01, clip_grad_norm=1.0, progress=False)
    fasthist.estimate_eps_range(model, batches, ce, optimizer="adamw", weight_decay=0.1, progress=False)
    after = bits(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_grads_restored():
    model, batches = make("dead_mlp", 0)
    ce(model, batches[0]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    copies = {n: g.clone() for n, g in grads.items()}
    fasthist.estimate_eps_range(model, batches, ce, progress=False)
    for n, p in model.named_parameters():
        assert p.grad is grads[n] and torch.equal(p.grad, copies[n])


def test_nonfinite_gradient_raises_and_leaves_weights():
    model, batches = make("dead_mlp", 0)
    before = bits(model)

    def bad(model, batch):
        return ce(model, batch) * float("inf")

    with pytest.raises(RuntimeError, match="non-finite gradient"):
        fasthist.estimate_eps_range(model, batches, bad, progress=False)
    after = bits(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- arguments and the registry -----------------------------------------------------------
def test_bad_arguments():
    model, batches = make("dead_mlp", 0)
    with pytest.raises(ValueError, match="Invalid optimizer"):
        fasthist.estimate_eps_range(model, batches, ce, optimizer="sgd", progress=False)
    with pytest.raises(ValueError, match="no batch"):
        fasthist.estimate_eps_range(model, [], ce, progress=False)
    with pytest.raises(ValueError, match="Invalid steps"):
        fasthist.estimate_eps_range(model, batches, ce, steps=0, progress=False)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        fasthist.estimate_eps_range(model, batches, ce, clip_grad_norm=0.0, progress=False)
    with pytest.raises(TypeError, match="one-element Tensor"):
        fasthist.estimate_eps_range(model, batches, lambda m, b: 1.0, progress=False)


def test_registry():
    assert {"adam", "adamw"} <= set(eps_optimizers())
    with pytest.raises(ValueError, match="already registered"):
        register_eps_optimizer("adam", lambda params, **kw: None, quantity="x")
    calls = []

    def factory(params, *, betas, weight_decay, bins):
        calls.append((betas, weight_decay))
        return fasthist.Adam(params, lr=0.0, betas=betas, eps=1.0, weight_decay=weight_decay, bins=bins)

    register_eps_optimizer("test-adam", factory, quantity="sqrt(v_hat)")
    try:
        model, batches = make("embedding", 0)
        res = fasthist.estimate_eps_range(model, batches, ce, optimizer="test-adam", progress=False)
        assert calls == [((0.9, 0.999), 0.0)]
        assert_agrees(res, rule_by_sort(model, batches, ce))
    finally:
        from fasthist import estimate

        estimate._REGISTRY.pop("test-adam")


def test_eps_pass_returns_the_optimizer_and_to_dict():
    model, batches = make("embedding", 0)
    opt = eps_pass(model, batches, ce, progress=False)
    assert isinstance(opt, fasthist.Adam)
    h = opt.histograms()["embed.weight"]
    assert h.zero_count == 24 * 8  # the 24 unused rows
    d = opt.eps_range().to_dict()
    assert {"low", "high", "low_raw", "high_raw", "candidates", "rows", "ambiguous"} <= set(d)
    assert grid_inside([1e-9, d["low"], d["high"], 10.0], opt.eps_range()) == [d["low"], d["high"]]
