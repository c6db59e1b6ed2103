"""Helpers shared by the tests of the compiled CPU ops (fasthist/csrc): two threads for
every test (tensors are cut between them), the gradients and runs of the fused-step tests,
and their exactness rule."""

from __future__ import annotations

import pytest
import torch
from _kernel_helpers import assert_ran

import fasthist.backend
import fasthist.csrc
import fasthist.dispatch

# torch's fused CPU kernels, as its x86 wheels build them, are reproduced bit for bit; on
# other builds the tests claim the dtype tolerances only
EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2")
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.fixture(autouse=True)
def two_threads():
    """Every test of a module that imports this runs on two threads (then restores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def grads(shapes, step, dtype):
    """Gradients spanning 8 decades; the first row of a 2-d shape is zero (the zero bin)."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for s in shapes:
        mag = 10.0 ** (torch.rand(s, generator=g) * 8 - 7)
        gr = torch.randn(s, generator=g) * mag
        if len(s) == 2:
            gr[0] = 0.0  # exact zeros in the state: the zero bin
        out.append(gr.to(dtype))
    return out


def run(cls, dtype, config, shapes, steps=6, scaler_skip_at=None, backend="auto"):
    """``steps`` fused steps of ``cls(params, fused=True, **config)`` under
    ``fasthist.backend.use(backend)``; returns (params, optimizer). A fasthist optimizer must
    have run on the compiled fused step (``auto``) or the pure torch ops (``reference``)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
    opt = cls(params, fused=True, **config)
    for step in range(steps):
        for p, gr in zip(params, grads(shapes, step, dtype), strict=True):
            p.grad = gr
        if scaler_skip_at is not None:  # what a GradScaler sets on a fused optimizer
            opt.grad_scale = torch.tensor(2.0)
            opt.found_inf = torch.tensor(1.0 if step == scaler_skip_at else 0.0)
        with fasthist.backend.use(backend):
            opt.step()
    if hasattr(opt, "backends"):
        expected = fasthist.backend.FUSED_CPU if backend == "auto" else fasthist.backend.TORCH
        assert_ran(opt, expected)
    return params, opt


def fused_chosen(decl, lists, target, kwargs) -> bool:
    """Whether the dispatcher gives this CPU call to the compiled fused step."""
    return fasthist.dispatch.choose(decl, torch.device("cpu"), lists, target, kwargs).backend == "fused_cpu"


def assert_close(a, b, dtype, *, equal_nan=False):
    """Bit-identical where EXACT (NaN positions too with ``equal_nan``), else within TOL."""
    if EXACT and not equal_nan:
        assert torch.equal(a, b)
        return
    tol = 0.0 if EXACT else TOL[dtype]
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=equal_nan)


def compiled_histogram_(target, values, scale, found_inf=None, *, sqrt=True, reciprocal=False) -> None:
    """The compiled CPU histogram pass (``fasthist.csrc.histogram_``), which must take the call."""
    assert fasthist.csrc.histogram_(target, (values, scale, found_inf), sqrt=sqrt, reciprocal=reciprocal)


def cpu_backend(on: bool) -> str:
    """The backend a CPU test asks for: ``auto`` (the compiled passes where they take a call)
    when ``on``, else ``reference`` (pure torch ops, the oracle)."""
    return "auto" if on else "reference"
