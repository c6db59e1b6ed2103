"""The fused CPU step (fasthist/csrc/fused_adam.cpp) that ``fused=True`` runs on CPU tensors:
states and parameters against torch's own fused CPU step (bit-identical where torch's
kernels are AVX512/AVX2, else within the dtype tolerances), and histograms against the
reference (torch's fused step, then the torch-op histogram: ``fasthist.backend.use("reference")``),
exactly.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from _cpu_helpers import EXACT, assert_close, fused_chosen, grads, run, two_threads  # noqa: F401 (autouse)

import fasthist
from fasthist import backend, csrc
from fasthist.adam import ADAM
from fasthist.target import HistTarget

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")

# Sizes: 8, 16 and 17 around torch's vector width and its 8-wide tail; 70,001 split between
# threads mid-tensor; an empty tensor; a 2-d odd shape; many small ones in a separate case.
SHAPES = [(8,), (16,), (17,), (70_001,), (0,), (37, 29)]
CONFIGS = [
    {},
    {"amsgrad": True},
    {"weight_decay": 0.1},
    {"maximize": True},
    {"betas": (0.3, 0.99)},  # torch's lerp switches formula at a weight of 0.5
    {"lr": torch.tensor(3e-3)},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
@pytest.mark.parametrize("cls", [fasthist.Adam, fasthist.AdamW], ids=lambda c: c.__name__)
def test_states_match_torch_fused(cls, dtype, config):
    base = torch.optim.Adam if cls is fasthist.Adam else torch.optim.AdamW
    p1, o1 = run(cls, dtype, config, SHAPES)
    p0, o0 = run(base, dtype, config, SHAPES)
    for a, b in zip(p1, p0, strict=True):
        assert_close(a.detach(), b.detach(), dtype)
        for key, value in o0.state[b].items():
            assert_close(o1.state[a][key], value, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
@pytest.mark.parametrize("cls", [fasthist.Adam, fasthist.AdamW], ids=lambda c: c.__name__)
def test_histograms_match_reference(cls, dtype, config):
    """Every count equal to the reference's (torch's fused step, torch-op histogram)."""
    _, o1 = run(cls, dtype, config, SHAPES, backend="auto")
    _, o0 = run(cls, dtype, config, SHAPES, backend="reference")
    for window in ("step", "total"):
        assert torch.equal(o1.histogram_rows(window).counts, o0.histogram_rows(window).counts)
    assert int(o1.histogram_rows("step").counts.sum()) == sum(torch.Size(s).numel() for s in SHAPES)


def test_many_small_tensors():
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 3000, (300,), generator=g)]
    p1, o1 = run(fasthist.Adam, torch.float32, {}, shapes, steps=3, backend="auto")
    p0, o0 = run(fasthist.Adam, torch.float32, {}, shapes, steps=3, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(p1, p0, strict=True)) or not EXACT
    assert torch.equal(o1.histogram_rows("total").counts, o0.histogram_rows("total").counts)


@pytest.mark.parametrize("skip_at", [None, 2])
def test_grad_scaler_and_found_inf(skip_at):
    """grad_scale divides (and writes the gradients back); found_inf = 1 skips the update,
    the step count and both windows, as torch's fused step and the reference do."""
    p1, o1 = run(fasthist.Adam, torch.float32, {}, SHAPES, scaler_skip_at=skip_at, backend="auto")
    p0, o0 = run(fasthist.Adam, torch.float32, {}, SHAPES, scaler_skip_at=skip_at, backend="reference")
    for a, b in zip(p1, p0, strict=True):
        assert_close(a.detach(), b.detach(), torch.float32)
        assert_close(a.grad, b.grad, torch.float32)
        assert torch.equal(o1.state[a]["step"], o0.state[b]["step"])
    for window in ("step", "total"):
        assert torch.equal(o1.histogram_rows(window).counts, o0.histogram_rows(window).counts)


def test_takes_the_fused_path_and_turns_down_what_it_cannot(monkeypatch):
    """The compiled step is asked for fused=True (or this file would test the reference
    against itself), and a non-contiguous state is turned down (it goes to the reference),
    never walked as if it were contiguous."""
    calls = []
    real = csrc.fused_step_
    monkeypatch.setattr(csrc, "fused_step_", lambda *a: calls.append(a[0].name) or real(*a))
    run(fasthist.Adam, torch.float32, {}, [(5,)], steps=1)
    assert calls == ["adam"]
    bins = fasthist.LogBins()
    target = HistTarget(
        bins,
        torch.zeros(1, bins.num_bins, dtype=torch.int64),
        torch.zeros(1, bins.num_bins, dtype=torch.int64),
        torch.tensor([0]),
    )
    kwargs = {"fused": True, "beta1": 0.9, "beta2": 0.999, "lr": 1e-3, "weight_decay": 0.0, "eps": 1e-8}
    contiguous = [[torch.zeros(8, 3)] for _ in range(4)] + [[], [torch.tensor(1.0)]]
    assert fused_chosen(ADAM, contiguous, target, kwargs)
    strided = [
        [torch.zeros(8, 3)],
        [torch.zeros(8, 6)[:, ::2]],
        [torch.zeros(8, 3)],
        [torch.zeros(8, 3)],
        [],
        [torch.tensor(1.0)],
    ]
    assert not fused_chosen(ADAM, strided, target, kwargs)
    assert not fused_chosen(ADAM, contiguous, target, {**kwargs, "fused": False})
    assert not fused_chosen(ADAM, contiguous, None, kwargs)


def test_the_fused_op_leaves_the_step_counts_to_the_backend():
    """``csrc.fused_step_`` takes ready inputs: it reads the step counts as already
    incremented and leaves them (:func:`fasthist.backend.stepped` increments them, and takes
    the increment back on a step skipped by ``found_inf``, as torch's ``_fused_adam`` does)."""
    if not csrc.available():
        pytest.skip("the compiled CPU library did not load")
    bins = fasthist.LogBins()
    target = HistTarget(
        bins,
        torch.zeros(1, bins.num_bins, dtype=torch.int64),
        torch.zeros(1, bins.num_bins, dtype=torch.int64),
        torch.tensor([0]),
    )
    steps = [torch.tensor(3.0)]
    lists = [[torch.ones(8)], [torch.ones(8)], [torch.zeros(8)], [torch.zeros(8)], [], steps]
    kwargs = {"beta1": 0.9, "beta2": 0.999, "lr": 1e-3, "weight_decay": 0.0, "eps": 1e-8, "found_inf": None}
    csrc.fused_step_(fasthist.Adam.declaration, lists, target, kwargs)
    assert float(steps[0]) == 3.0
    for found_inf, expected in ((torch.tensor(1.0), 3.0), (torch.tensor(0.0), 4.0)):
        ready = dict(kwargs, found_inf=found_inf)
        backend.stepped(
            lists, ready, torch.device("cpu"), lambda r: csrc.fused_step_(fasthist.Adam.declaration, lists, target, r)
        )
        assert float(steps[0]) == expected
