"""fasthist.unwrap: the fasthist optimizer inside a framework's wrapper (Accelerate's
AcceleratedOptimizer, Lightning's LightningOptimizer, ... all keep it in ``.optimizer``)."""

from __future__ import annotations

import pytest
import torch

import fasthist
from fasthist.integrations.tensorboard import log_histograms


class Wrapper:
    """The shape of Accelerate's AcceleratedOptimizer: the wrapped optimizer in .optimizer,
    step/zero_grad forwarded."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


class Writer:
    def __init__(self):
        self.histograms, self.scalars = [], []

    def add_histogram_raw(self, tag, **kw):
        self.histograms.append(tag)

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append(tag)


def stepped(opt_cls=fasthist.Adam):
    model = torch.nn.Linear(4, 3)
    opt = opt_cls(model.parameters(), lr=1e-2)
    wrapped = Wrapper(Wrapper(opt))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    wrapped.step()
    return opt, wrapped


def test_unwrap_follows_the_optimizer_chain():
    opt, wrapped = stepped()
    assert fasthist.unwrap(opt) is opt
    assert fasthist.unwrap(wrapped) is opt


def test_integrations_take_a_wrapped_optimizer():
    opt, wrapped = stepped()
    w1, w2 = Writer(), Writer()
    assert log_histograms(w1, wrapped, 1) == log_histograms(w2, opt, 1)
    assert w1.histograms == w2.histograms and w1.histograms
    rec = fasthist.QuantileRecorder(wrapped)
    assert rec.opt is opt


def test_no_fasthist_optimizer_inside_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"Wrapper -> Wrapper -> Adam: none of them is a fasthist optimizer"):
        fasthist.unwrap(Wrapper(Wrapper(torch.optim.Adam(model.parameters()))))
    looped = Wrapper(None)
    looped.optimizer = looped  # a wrapper that points at itself: no endless loop
    with pytest.raises(TypeError, match="Wrapper: none"):
        fasthist.unwrap(looped)
    with pytest.raises(TypeError, match="int"):
        fasthist.QuantileRecorder(3)
