"""The fused CPU Adagrad step (fasthist/csrc/fused_adagrad.cpp) that ``fused=True`` runs on
CPU tensors: states and parameters against torch's own fused CPU Adagrad (bit-identical where
torch's kernels are AVX512/AVX2, else within the dtype tolerances), and histograms against
the reference (torch's fused step, then the torch-op histogram: ``fasthist.backend.use("reference")``),
exactly.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from _cpu_helpers import assert_close as helpers_assert_close
from _cpu_helpers import fused_chosen, grads, run, two_threads  # noqa: F401 (autouse)

import fasthist
from fasthist import csrc
from fasthist.adagrad import ADAGRAD
from fasthist.target import HistTarget

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")

# Sizes: 15, 16 and 17 around torch's 16-element body/tail split (bfloat16/float16 take other
# coefficients in the tail), 8 and 31 inside and across it; 70,001 split between threads
# mid-tensor; an empty tensor; a 2-d odd shape (with a row of zero gradients: the zero bin).
SHAPES = [(8,), (15,), (16,), (17,), (31,), (70_001,), (0,), (37, 29)]
CONFIGS = [
    {},
    {"weight_decay": 0.1},
    {"lr_decay": 0.05},
    {"maximize": True},
    {"initial_accumulator_value": 0.25},
    {"eps": 1e-3, "lr": 0.3},  # eps and clr away from what rounds to the dtype unchanged
    {"lr": torch.tensor(3e-3)},
]


def assert_close(a, b, dtype):
    """NaN where torch has NaN: float16's eps = 1e-10 rounds to 0 in torch's vector body, so a
    zero sum with a zero gradient gives 0/0 there."""
    helpers_assert_close(a, b, dtype, equal_nan=True)


def assert_same_histograms(o1, o0, shapes):
    for window in ("step", "total"):
        assert torch.equal(o1.histogram_rows(window).counts, o0.histogram_rows(window).counts)
    assert int(o1.histogram_rows("step").counts.sum()) == sum(torch.Size(s).numel() for s in shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_states_match_torch_fused(dtype, config):
    p1, o1 = run(fasthist.Adagrad, dtype, config, SHAPES)
    p0, o0 = run(torch.optim.Adagrad, dtype, config, SHAPES)
    for a, b in zip(p1, p0, strict=True):
        assert_close(a.detach(), b.detach(), dtype)
        for key, value in o0.state[b].items():
            assert_close(o1.state[a][key], value, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_histograms_match_reference(dtype, config):
    """Every count equal to the reference's (torch's fused step, torch-op histogram)."""
    _, o1 = run(fasthist.Adagrad, dtype, config, SHAPES, backend="auto")
    _, o0 = run(fasthist.Adagrad, dtype, config, SHAPES, backend="reference")
    assert_same_histograms(o1, o0, SHAPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_small_tensors(dtype):
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 3000, (300,), generator=g)]
    p1, o1 = run(fasthist.Adagrad, dtype, {}, shapes, steps=3, backend="auto")
    p0, o0 = run(fasthist.Adagrad, dtype, {}, shapes, steps=3, backend="reference")
    for a, b in zip(p1, p0, strict=True):
        assert_close(a.detach(), b.detach(), dtype)
    assert_same_histograms(o1, o0, shapes)


@pytest.mark.parametrize("skip_at", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grad_scaler_and_found_inf(dtype, skip_at):
    """grad_scale divides (and writes the gradients back); found_inf = 1 skips the update,
    the step count and both windows, as torch's fused step and the reference do."""
    kw = {"scaler_skip_at": skip_at}
    p1, o1 = run(fasthist.Adagrad, dtype, {"lr_decay": 0.1}, SHAPES, **kw)
    p0, o0 = run(fasthist.Adagrad, dtype, {"lr_decay": 0.1}, SHAPES, backend="reference", **kw)
    for a, b in zip(p1, p0, strict=True):
        assert_close(a.detach(), b.detach(), dtype)
        assert_close(a.grad, b.grad, dtype)
        assert_close(o1.state[a]["sum"], o0.state[b]["sum"], dtype)
        assert torch.equal(o1.state[a]["step"], o0.state[b]["step"])
    assert_same_histograms(o1, o0, SHAPES)


def test_takes_the_fused_path_and_turns_down_what_it_cannot(monkeypatch):
    """The compiled step is asked for fused=True (or this file would test the reference
    against itself), and a non-contiguous state or a sparse gradient is turned down (it
    goes to the reference), never walked as if it were contiguous."""
    calls = []
    real = csrc.fused_step_
    monkeypatch.setattr(csrc, "fused_step_", lambda *a: calls.append(a[0].name) or real(*a))
    run(fasthist.Adagrad, torch.float32, {}, [(5,)], steps=1)
    assert calls == ["adagrad"]
    bins = fasthist.LogBins()
    target = HistTarget(
        bins,
        torch.zeros(1, bins.num_bins, dtype=torch.int64),
        torch.zeros(1, bins.num_bins, dtype=torch.int64),
        torch.tensor([0]),
    )
    kwargs = {"fused": True, "lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "eps": 1e-10}
    contiguous = [[torch.zeros(8, 3)] for _ in range(3)] + [[torch.tensor(1.0)]]
    assert fused_chosen(ADAGRAD, contiguous, target, kwargs)
    strided = [[torch.zeros(8, 3)], [torch.zeros(8, 3)], [torch.zeros(8, 6)[:, ::2]], [torch.tensor(1.0)]]
    assert not fused_chosen(ADAGRAD, strided, target, kwargs)
    assert not fused_chosen(ADAGRAD, contiguous, target, {**kwargs, "has_sparse_grad": True})
    assert not fused_chosen(ADAGRAD, contiguous, target, {**kwargs, "fused": False})
    assert not fused_chosen(ADAGRAD, contiguous, None, kwargs)


def test_torch_compile_traces_the_op():
    """The fake kernel lets torch.compile (aot_eager: functionalization of the op's declared
    writes) trace a step that calls the op: the op is in the compiled graph, the step is
    compiled at the first call only (the ISA probe that chooses the tail rounding is read at
    import, not in the step), and the compiled step equals the eager one."""
    from torch._dynamo.backends.registry import lookup_backend

    targets: list[str] = []
    graphs = [0]

    def backend(gm, example_inputs):  # records what was compiled, then aot_eager compiles it
        graphs[0] += 1
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return lookup_backend("aot_eager")(gm, example_inputs)

    shapes = [(40,), (7,), (3, 5)]

    def steps(compiled):
        torch._dynamo.reset()
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
        opt = fasthist.Adagrad(params, lr=torch.tensor(1e-2), lr_decay=0.01, fused=True)
        fn = torch.compile(opt.step, backend=backend) if compiled else opt.step
        frames = []
        for step in range(4):
            for p, gr in zip(params, grads(shapes, step, torch.float32), strict=True):
                p.grad = gr
            fn()
            frames.append(graphs[0])
        return params, opt, frames

    p0, o0, _ = steps(False)
    p1, o1, frames = steps(True)
    assert any("fused_adagrad_hist_" in t for t in targets), targets
    assert frames[0] >= 1 and frames[-1] == frames[0], f"recompiled: graphs after each step {frames}"
    for a, b in zip(p1, p0, strict=True):
        assert torch.equal(a.detach(), b.detach())
    assert_same_histograms(o1, o0, shapes)
