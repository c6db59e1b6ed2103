"""The compiled CPU pass clears only last step's span of each step row (``Windows::span`` in
fasthist/csrc/windows.h), trusting that span only while the step buffer's version
counter says nothing else wrote it. Every test here runs a sequence of calls whose spans
move (values of other magnitudes each call), with someone else writing the step window in
between, and checks the step row against the torch-op oracle on fresh windows: a stale
count anywhere fails.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from _cpu_helpers import assert_close, compiled_histogram_, two_threads  # noqa: F401 (autouse)
from _kernel_helpers import assert_ran
from _optim_db import grads_at

import fasthist
from fasthist import LogBins, csrc
from fasthist.reference.histogram import accumulate_
from fasthist.target import HistTarget

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")

BINS = LogBins()
# a tensor cut between threads (70,001 and 200,003 with 2-3 threads), an empty one, small ones
SIZES = [1023, 70_001, 0, 5, 200_003, 3000]


def values_at(call: int) -> list[torch.Tensor]:
    """Values whose magnitudes move by decades from call to call: disjoint spans."""
    g = torch.Generator().manual_seed(call)
    decade = [0, -8, 6, -3, 2][call % 5]
    return [torch.rand(n, generator=g) * 10.0**decade for n in SIZES]


def oracle(values, scale, rows, nrows) -> torch.Tensor:
    """The step window the torch-op path writes into zeroed windows."""
    z = torch.zeros(nrows, BINS.num_bins, dtype=torch.int64)
    t = HistTarget(BINS, z, z.clone(), rows)
    accumulate_(t, values, scale)
    return t.step


def new_target() -> HistTarget:
    nrows = len(SIZES) + 2
    rows = torch.randperm(nrows, generator=torch.Generator().manual_seed(5))[: len(SIZES)]
    start = torch.randint(0, 100, (2, nrows, BINS.num_bins), dtype=torch.int64)
    return HistTarget(BINS, start[0].clone(), start[1].clone(), rows)


def _scribble_view(target, call):  # a row written through a view (as a state tensor is)
    target.step[target.rows[1]].fill_(call + 1)


def _scribble_reset(target, call):
    target.step.zero_()


def _scribble_index_copy(target, call):  # what the torch-op path and merges do
    junk = torch.full((len(SIZES), BINS.num_bins), 3, dtype=torch.int64)
    target.step.index_copy_(0, target.rows, junk)


def _scribble_torch_ops(target, call):  # the torch-op path itself, on other values
    accumulate_(target, values_at(call + 100), [1.0] * len(SIZES))


def _scribble_other_target(target, call):  # another target over the same rows and buffers
    other = HistTarget(BINS, target.step, target.total, target.rows)
    compiled_histogram_(other, values_at(call + 200), [0.5] * len(SIZES))


def _scribble_op_without_spans(target, call):  # the op as a compiled step calls it: no spans
    torch.ops.fasthist.histogram_(
        values_at(call + 300),
        torch.ones(len(SIZES)),
        None,
        True,
        False,
        BINS.shift,
        BINS.low_key,
        BINS.num_log_bins,
        target.rows,
        target.step,
        target.total,
    )


def _scribble_shared_workspace(target, call):
    """A target rebuilt around the same workspace (as a compiled step's opaque call does),
    writing copies of the windows: the real rows are untouched, and their spans too."""
    other = HistTarget(BINS, target.step.clone(), target.total.clone(), target.rows, target._workspace)
    compiled_histogram_(other, values_at(call + 400), [2.0] * len(SIZES))


SCRIBBLES = {
    "none": None,
    "view": _scribble_view,
    "reset": _scribble_reset,
    "index_copy": _scribble_index_copy,
    "torch_ops": _scribble_torch_ops,
    "other_target": _scribble_other_target,
    "op_without_spans": _scribble_op_without_spans,
    "shared_workspace": _scribble_shared_workspace,
}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("scribble", list(SCRIBBLES))
def test_step_rows_exact_when_others_write(threads, scribble):
    torch.set_num_threads(threads)
    assert csrc.available()
    target = new_target()
    write = SCRIBBLES[scribble]
    for call in range(6):
        values = values_at(call)
        scale = [0.3 + 0.1 * call] * len(SIZES)
        compiled_histogram_(target, values, scale)
        expected = oracle(values, scale, target.rows, target.step.shape[0])
        assert torch.equal(target.step[target.rows], expected[target.rows]), f"call {call}"
        if write is not None and call % 2 == 0:
            write(target, call)


def test_skipped_step_keeps_rows_and_spans():
    """A step skipped by found_inf writes nothing; the spans stay those of the rows."""
    target = new_target()
    compiled_histogram_(target, values_at(0), [1.0] * len(SIZES))
    before = target.step.clone()
    compiled_histogram_(target, values_at(1), [1.0] * len(SIZES), torch.tensor(1.0))
    assert torch.equal(target.step, before)
    compiled_histogram_(target, values_at(2), [1.0] * len(SIZES))
    expected = oracle(values_at(2), [1.0] * len(SIZES), target.rows, target.step.shape[0])
    assert torch.equal(target.step[target.rows], expected[target.rows])


def _adam_steps(name, between):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in [(100, 300), (7,), (70_001,), (0,), (3, 5)]]
    opt = fasthist.Adam(params)
    out = []
    for step in range(6):
        for p, gr in zip(params, grads_at(step, params), strict=True):
            p.grad = gr * 10.0 ** (3 * (step % 3) - 3)  # moving magnitudes: moving spans
        with fasthist.backend.use(name):
            opt.step()
        assert_ran(opt, *{"auto": ("fused_cpu", "torch+cpu_histogram"), "reference": ("torch",)}[name])
        out.append(opt.histogram_rows("step").counts.clone())
        opt = between(opt, params, step)
    return out


def _reset(opt, params, step):
    if step % 2 == 0:
        opt.reset_histograms()
    return opt


def _reload(opt, params, step):
    sd = opt.state_dict()
    if step % 2 == 0:  # other counts in the rows: the saved ones, scrambled
        for st in sd["state"].values():
            st["hist_step"] = torch.randint(0, 5, st["hist_step"].shape[:1])  # int64 counts load as they are
    opt.load_state_dict(sd)
    return opt


def _fused_flip(opt, params, step):
    for group in opt.param_groups:
        group["fused"] = step % 2 == 0  # the fused CPU step writes the same rows
    return opt


@pytest.mark.parametrize("between", [_reset, _reload, _fused_flip], ids=lambda f: f.__name__)
def test_optimizer_steps_exact(between):
    """Through the optimizer: reset_histograms, load_state_dict and the fused step writing
    the rows between default steps; the step windows equal the torch-op path's."""
    got = _adam_steps("auto", between)
    want = _adam_steps("reference", between)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def _steps_in_inference_mode(cls, name, **config):
    """Adam steps with moving magnitudes (moving spans), all under ``torch.inference_mode()``
    from the first (the state and the packed windows are then inference tensors, which have
    no version counter); returns the parameters and each step's step window (or None)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in [(100, 300), (7,), (70_001,), (0,), (3, 5)]]
    opt = cls(params, **config)
    rows = []
    with torch.inference_mode():
        for step in range(6):
            for p, gr in zip(params, grads_at(step, params), strict=True):
                p.grad = gr * 10.0 ** (3 * (step % 3) - 3)
            with fasthist.backend.use(name):
                opt.step()
            if isinstance(opt, fasthist.Adam):  # the compiled pass or fused step, as asked
                fused = "fused_cpu" if config.get("fused") else "torch+cpu_histogram"
                assert_ran(opt, fused if name == "auto" else "torch")
            rows.append(opt.histogram_rows("step").counts.clone() if isinstance(opt, fasthist.Adam) else None)
    return params, rows


@pytest.mark.parametrize(
    ("name", "fused"), [("auto", False), ("auto", True), ("reference", False)], ids=["cpp", "fused", "torch_ops"]
)
def test_inference_mode_steps_like_torch(name, fused):
    """``opt.step()`` under ``torch.inference_mode()`` steps as torch's Adam does there (the
    same parameters, bit for bit: the update is torch's own, or reproduces its fused step),
    and its step windows are the torch-op path's outside inference mode: with no version
    counter to trust, every step row is cleared in full."""
    got, rows = _steps_in_inference_mode(fasthist.Adam, name, fused=fused)
    want, _ = _steps_in_inference_mode(torch.optim.Adam, name, fused=fused)
    for a, b in zip(got, want, strict=True):
        if fused:  # torch's fused CPU step, reproduced bit for bit where its kernels are x86's
            assert_close(a, b, torch.float32)
        else:  # torch's own update
            assert torch.equal(a, b)
    oracle_rows = _adam_steps("reference", lambda opt, params, step: opt)
    for a, b in zip(rows, oracle_rows, strict=True):
        assert torch.equal(a, b)
