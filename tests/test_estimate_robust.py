"""estimate_eps_range with what users pass it: iterables of unknown
length, bad arguments rejected before any work, and the model left exactly as it was
(parameters and buffers, by name) whatever fails."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import fasthist
from fasthist.estimate import eps_pass


class Stream(IterableDataset):
    """No ``__len__``: a DataLoader over it raises TypeError from ``len()``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            yield torch.randn(4, generator=g)


class LyingLength:
    """An iterable whose ``__len__`` raises (as DataLoader's does for an IterableDataset)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        raise TypeError("no len()")

    def __iter__(self):
        return iter(self.items)


def sum_loss(model, batch):
    return model(batch).square().sum()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k].detach(), v), k


@pytest.mark.parametrize(
    "make",
    [
        lambda: DataLoader(Stream(6), batch_size=2),  # the reported case
        lambda: (torch.randn(2, 4) for _ in range(3)),  # a generator: no __len__ at all
        lambda: LyingLength([torch.randn(2, 4) for _ in range(3)]),  # __len__ that raises
    ],
)
@pytest.mark.parametrize("progress", [False, True])
def test_any_iterable_works(make, progress):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    res = fasthist.estimate_eps_range(model, make(), sum_loss, progress=progress)
    assert res.low <= res.high and all(r.nonzero == r.numel for r in res.rows)


def test_iterable_of_unknown_length_with_steps():
    model = nn.Linear(4, 3)
    opt = eps_pass(model, DataLoader(Stream(10), batch_size=2), sum_loss, steps=2, progress=True)
    assert int(opt.state[model.weight]["step"]) == 2


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"weight_decay": math.inf}, "weight_decay"),  # the reported case: NaN weights afterwards
        ({"weight_decay": math.nan}, "weight_decay"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"clip_grad_norm": math.inf}, "clip_grad_norm"),
        ({"clip_grad_norm": math.nan}, "clip_grad_norm"),
        ({"betas": (0.9, math.nan)}, "betas"),
        ({"betas": (math.inf, 0.9)}, "betas"),
        ({"low": math.nan}, "percentiles"),
        ({"high": math.inf}, "percentiles"),
        ({"weight_decay": "0.1"}, "weight_decay"),
        ({"steps": 2.0}, "steps"),
    ],
)
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_bad_arguments_rejected_before_any_work(kwargs, needle, optimizer):
    model = nn.Linear(4, 3)
    before = snapshot(model)
    calls = []

    def batches():
        calls.append(1)
        yield torch.randn(2, 4)

    with pytest.raises(ValueError, match=needle):
        fasthist.estimate_eps_range(model, batches(), sum_loss, optimizer=optimizer, progress=False, **kwargs)
    assert calls == []  # not a single batch drawn
    assert_same(model, before)


class HugeDecayOverflow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((8,), 1e30))

    def forward(self, x):
        return (self.w * x).sum()


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "adagrad"])
def test_weights_restored_when_a_finite_decay_overflows(optimizer):
    # coupled decay: 1e30 * 1e30 is inf in float32, the lr=0 step writes 0 * inf = NaN; the
    # pass must notice, fail, and give the weights back bit for bit. (AdamW's decoupled decay
    # scales by 1 - lr * wd = 1 at lr=0: nothing to notice there.)
    model = HugeDecayOverflow()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="changed"):
        fasthist.estimate_eps_range(
            model, [torch.ones(8)] * 2, lambda m, b: m(b), optimizer=optimizer, weight_decay=1e30, progress=False
        )
    assert_same(model, before)


class Fails(Exception):
    pass


def test_weights_and_buffers_restored_when_the_loss_fails_midway():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    before = snapshot(model)
    n = [0]

    def loss(m, b):
        n[0] += 1
        if n[0] == 3:
            with torch.no_grad():  # a loss that also scribbles on the weights, then fails
                m[0].weight.mul_(7.0)
            raise Fails("boom")
        return m(b).square().sum()

    with pytest.raises(Fails):
        fasthist.estimate_eps_range(model, [torch.randn(5, 4) for _ in range(4)], loss, progress=False)
    assert_same(model, before)


class Accumulates(nn.Module):
    """Reassigns its buffer in forward (a new tensor object each time): restoring by copying
    into the tensor saved beforehand leaves the new object in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("total", torch.zeros(4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64), persistent=False)

    def forward(self, x):
        self.total = self.total + x.sum(0).detach()
        self.calls = self.calls + 1
        return self.lin(x)


class Shared(nn.Module):
    """The same submodule (with its reassigned buffers) under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Accumulates()
        self.b = self.a

    def forward(self, x):
        return self.b(x)


@pytest.mark.parametrize("cls", [Accumulates, Shared])
@pytest.mark.parametrize("fail", [False, True])
def test_reassigned_buffers_restored_by_name(cls, fail):
    model = cls()
    originals = {n: b for n, b in model.named_buffers()}
    before = snapshot(model)

    def loss(m, batch):
        out = m(batch).sum()
        if fail and int(next(b for n, b in m.named_buffers() if n.endswith("calls"))) == 2:
            raise Fails("late")
        return out

    batches = [torch.randn(3, 4) for _ in range(3)]
    if fail:
        with pytest.raises(Fails):
            fasthist.estimate_eps_range(model, batches, loss, progress=False)
    else:
        fasthist.estimate_eps_range(model, batches, loss, progress=False)
    assert_same(model, before)
    for n, b in model.named_buffers():  # the very tensor objects the model had before
        assert b is originals[n], n
    assert int(model.a.calls if cls is Shared else model.calls) == 0


class SwapsParameter(nn.Module):
    """Replaces a Parameter object in forward (some re-parametrisation hacks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.v = nn.Parameter(torch.ones(3))

    def forward(self, x):
        out = (self.w * x).sum() + (self.v * x).sum()
        self.v = nn.Parameter(self.v.detach() * 2)
        return out


def test_replaced_parameter_restored_by_name():
    model = SwapsParameter()
    w, v = model.w, model.v
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="changed"):  # the gradients were not at the initial weights
        fasthist.estimate_eps_range(model, [torch.ones(3)] * 2, lambda m, b: m(b), progress=False)
    assert model.w is w and model.v is v
    assert_same(model, before)


class NaNGradient(nn.Module):
    """``good`` gets ordinary gradients; ``bad``'s gradient is NaN (a backward hook), while
    the loss and every forward value stay finite: a tensor that ``exclude=`` should be able
    to leave out of the rule, as it can in ``opt.eps_range(exclude=...)``."""

    def __init__(self, nan: bool = True) -> None:
        super().__init__()
        self.good = nn.Parameter(torch.linspace(0.5, 2.0, 16))
        self.bad = nn.Parameter(torch.linspace(-1.0, 1.0, 8))
        if nan:
            self.bad.register_hook(lambda g: torch.full_like(g, math.nan))

    def forward(self, x):
        return (self.good * x).square().sum() + self.bad.sum()


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_exclude_leaves_out_a_tensor_with_nan_gradients(optimizer):
    # exclude= is applied before the finiteness check, as eps_range_from_counts does it:
    # the excluded tensor's NaN gradients neither stop the pass nor reach its weights
    # (its NaN update is undone after each step), and the range is the good tensor's.
    model = NaNGradient()
    before = snapshot(model)
    batches = [torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.raises(RuntimeError, match="non-finite gradient at batch 0 in bad; exclude="):
        fasthist.estimate_eps_range(model, batches, sum_loss, optimizer=optimizer, progress=False)
    assert_same(model, before)
    res = fasthist.estimate_eps_range(model, batches, sum_loss, optimizer=optimizer, progress=False, exclude="bad")
    assert_same(model, before)  # bit for bit, the NaN-updated tensor too
    assert res.excluded == ["bad"] and res.low_tensor == res.high_tensor == "good"
    assert res.paper is None  # over every tensor the rule has no answer (bad's percentiles are NaN)
    finite = fasthist.estimate_eps_range(
        NaNGradient(nan=False), batches, sum_loss, optimizer=optimizer, progress=False, exclude="bad"
    )
    assert (res.low_raw, res.high_raw) == (finite.low_raw, finite.high_raw)  # good's moments, bad's left out
    assert res.rows[0] == finite.rows[0] and math.isnan(res.rows[1].low) and not math.isnan(finite.rows[1].low)


def test_clipping_spreads_an_excluded_nan_gradient_and_fails():
    # clip_grad_norm's total norm takes every tensor, as the training it mirrors does: one
    # NaN gradient makes every clipped gradient NaN, and the pass says so
    model = NaNGradient()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="non-finite gradient at batch 0 in good.*clip_grad_norm"):
        fasthist.estimate_eps_range(
            model, [torch.randn(16)], sum_loss, clip_grad_norm=1.0, progress=False, exclude="bad"
        )
    assert_same(model, before)
