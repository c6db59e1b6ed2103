"""The Triton kernels inside a compiled step: one opaque operator, ``fasthist::functional_``
(see :mod:`fasthist.compiled` for why not ``triton_op``).

On a machine without CUDA they run under Triton's interpreter (``fasthist.backend.use("triton")``,
``TRITON_INTERPRET=1``), on the ``aot_eager`` backend: the operator's declared writes go
through functionalization, which is where a compiled step could lose an update. With a GPU,
``test_reduce_overhead_cuda_graphs`` runs the step under ``mode="reduce-overhead"``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _kernel_helpers import INTERPRETING, ON_CPU, assert_ran
from _optim_db import BY_NAME, grads_at, make_params
from torch._dynamo.testing import CompileCounterWithBackend

import fasthist.backend

pytest.importorskip("triton")
pytest.importorskip("fasthist.kernels.adam")

if ON_CPU and not INTERPRETING:
    pytest.skip("fasthist.kernels needs TRITON_INTERPRET=1 on a machine without CUDA", allow_module_level=True)

pytestmark = pytest.mark.interpreter if ON_CPU else []

# one flag set per kernel; Tensor lr, so a scheduler changes no constant of the graph
CASES = {
    "adam": {"lr": torch.tensor(1e-2), "amsgrad": True, "weight_decay": 0.1},
    "rmsprop": {"lr": torch.tensor(1e-3), "centered": True, "momentum": 0.9},
    "adagrad": {"lr": torch.tensor(1e-2), "lr_decay": 1e-2},
    "adabelief": {"lr": torch.tensor(1e-2), "weight_decay": 1e-2},
}


def _run(name: str, compile_kwargs: dict | None, steps: int, device: str = "cpu", ran: str | None = "triton"):
    torch._dynamo.reset()
    params = [p.detach().to(device).requires_grad_() for p in make_params(4)]
    kwargs = {k: v.clone().to(device) if isinstance(v, torch.Tensor) else v for k, v in CASES[name].items()}
    if name in ("adam", "rmsprop"):
        # dynamo traces torch's optimizers with capturable=True (torch's compiled Adam is its
        # capturable Adam), and so the kernels see it: the eager run that equals it bit for bit
        kwargs["capturable"] = True
    opt = BY_NAME[name].cls(params, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    counter = None
    fn = opt.step
    if compile_kwargs is not None:
        counter = CompileCounterWithBackend(compile_kwargs.pop("backend", "inductor"))
        fn = torch.compile(lambda: opt.step(), backend=counter, **compile_kwargs)
    grads = [[g.to(device) for g in grads_at(t, params)] for t in range(steps)]
    for t in range(steps):
        for p, g in zip(params, grads[t], strict=True):
            p.grad = g  # the same tensors every step: copied into static places under CUDA graphs
        fn()
        sched.step()
    if compile_kwargs is None and ran is not None:  # compiled steps are not recorded: tests count their calls
        assert_ran(opt, ran)
    rows = [opt.histogram_rows(w).counts.cpu() for w in ("step", "total")]
    return [p.detach().cpu() for p in params], rows, counter


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_in_compiled_step(use_backend, monkeypatch, name):
    """Compiles once over 10 steps with a scheduler; parameters, states and both histogram
    windows bit for bit those of the eager kernel step (the operator runs the eager launch)."""
    use_backend("triton")
    p_eager, h_eager, _ = _run(name, None, 10)
    ran, run = [], fasthist.backend.run
    monkeypatch.setattr(fasthist.backend, "run", lambda name, *a: ran.append(name) or run(name, *a))
    p_comp, h_comp, counter = _run(name, {"backend": "aot_eager"}, 10)
    assert counter.frame_count == 1
    assert ran == ["triton"] * 10
    for a, b in zip(h_comp + p_comp, h_eager + p_eager, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_reduce_overhead_cuda_graphs(use_backend, monkeypatch, name):
    """``torch.compile(mode="reduce-overhead")`` on CUDA: one compilation, the step replayed
    as a CUDA graph (no cudagraph skip), and the same parameters and histograms as eager."""
    from torch._dynamo.utils import counters

    use_backend("triton")
    cuda = "cuda"
    p_eager, h_eager, _ = _run(name, None, 12, cuda)
    counters.clear()
    ran, run = [], fasthist.backend.run
    monkeypatch.setattr(fasthist.backend, "run", lambda name, *a: ran.append(name) or run(name, *a))
    p_comp, h_comp, counter = _run(name, {"mode": "reduce-overhead"}, 12, cuda)
    assert counter.frame_count == 1
    assert ran and set(ran) == {"triton"}  # the kernel, wherever the graph replays it
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    for a, b in zip(h_comp, h_eager, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(p_comp, p_eager, strict=True):
        assert torch.equal(a, b)


def test_compiled_step_self_tests_the_kernel(use_backend, monkeypatch):
    """The self-test runs where the operator runs the kernel (a compiled step cannot choose
    again, the operator can): a launcher that miscounts under both histogram strategies is
    turned down there, with the self-test's warning, and every compiled step runs torch's
    form in its place, the parameters and histograms those of the eager torch backend."""
    import importlib

    from fasthist import selftest
    from fasthist.adam import ADAM

    if ON_CPU:  # dynamo steps with capturable=True, which torch's forms refuse on the CPU
        # outside a trace: let them (the same tensor ops), so that the self-test has a
        # reference to compare with and the fallback a form to run
        adam = importlib.import_module("torch.optim.adam")  # torch.optim deletes its attribute
        devices = adam._get_capturable_supported_devices() + ["cpu"]
        monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda: devices)
        monkeypatch.setattr(fasthist.backend, "_get_capturable_supported_devices", lambda: devices)
    use_backend("torch")
    p_torch, h_torch, _ = _run("adam", None, 3, ran=None)  # torch's form, its histogram pass either one
    monkeypatch.setattr(selftest, "_VERDICTS", {})
    monkeypatch.delenv("FASTHIST_SELFTEST", raising=False)  # the tests' conftest turns it off
    real = fasthist.backend.kernel_function(ADAM)

    def miscounting(*lists, hist=None, **kwargs):
        real(*lists, hist=hist, **kwargs)
        hist.step[0, 5] += 1

    monkeypatch.setattr(fasthist.backend, "kernel_function", lambda decl: miscounting if decl is ADAM else real)
    ran, run = [], fasthist.backend.run
    monkeypatch.setattr(fasthist.backend, "run", lambda name, *a: ran.append(name) or run(name, *a))
    use_backend("triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p_comp, h_comp, counter = _run("adam", {"backend": "aot_eager"}, 3)
    said = [str(w.message) for w in caught if "self-test" in str(w.message)]
    assert len(said) == 1 and "self-test of the Triton adam kernel" in said[0], said
    assert "with tl.histogram too" in said[0] and "runs on another backend" in said[0]
    assert counter.frame_count == 1
    # the self-test ran the kernel twice (then with tl), its reference and bisection the
    # torch form; each of the 3 compiled steps then ran the torch form
    assert ran.count("triton") == 2 and ran[-3:] == ["torch"] * 3, ran
    for a, b in zip(h_comp + p_comp, h_torch + p_torch, strict=True):
        assert torch.equal(a, b)
