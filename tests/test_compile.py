"""``torch.compile`` of a function that calls ``opt.step()``: compiles once, and computes
what the eager step computes.

Why the backends: the recompile and equality tests run on ``aot_eager`` (dynamo + AOT
autograd's functionalization, which is where the opaque operators' declared writes and
the in-place histogram windows could go wrong, at a fraction of inductor's compile time on
CI's 2 cores); a smaller set runs inductor, whose generated code is what users get and
what the benchmark times. Each compiled step is checked against an eager run over the same
gradients: histograms (both windows) bit for bit; the update bit for bit against what the
same compiler makes of torch's own optimizer (torch's compiled update differs from its
eager one by a few ulp: bias corrections in float32 tensors, not host floats), and for
AdaBelief, whose update runs eagerly inside an opaque operator, against the eager step.
"""

from __future__ import annotations

import pytest
import torch
from _optim_db import BY_NAME, grads_at, make_params
from torch._dynamo.testing import CompileCounterWithBackend

import fasthist
from fasthist.declaration import OptimizerDecl

STEPS = 50
# Tensor lr (no recompile in torch either); betas/eps/flags that change what is traced
CASES = {
    "adam": {"lr": torch.tensor(1e-2)},
    "adam-amsgrad-wd": {"lr": torch.tensor(1e-2), "amsgrad": True, "weight_decay": 0.1, "betas": (0.8, 0.99)},
    "adam-foreach": {"lr": 1e-2, "foreach": True},  # torch refuses a Tensor lr here: no scheduler
    "adamw": {"lr": torch.tensor(1e-2)},
    "rmsprop": {"lr": torch.tensor(1e-3), "centered": True, "momentum": 0.9},
    "adagrad": {"lr": torch.tensor(1e-2), "lr_decay": 1e-2},
    "adabelief": {"lr": torch.tensor(1e-2), "weight_decay": 1e-2},
    "adabelief-amsgrad": {"lr": torch.tensor(1e-2), "amsgrad": True, "rectify": False},
}


def _cls(case: str):
    return BY_NAME[case.split("-")[0]].cls


def _torch_cls(case: str):
    name = case.split("-")[0]
    return None if name == "adabelief" else BY_NAME[name].reference


def _run(cls, kwargs: dict, compile_backend: str | None, steps: int = STEPS, scheduler: bool = True):
    """``steps`` steps with a StepLR every 10 steps; the params, the optimizer and the compile counter."""
    torch._dynamo.reset()
    params = make_params(3)
    kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    opt = cls(params, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10, 0.5) if scheduler else None
    counter = CompileCounterWithBackend(compile_backend) if compile_backend else None

    def step():
        opt.step()

    fn = torch.compile(step, backend=counter) if counter else step
    for t in range(steps):
        for p, g in zip(params, grads_at(t, params), strict=True):
            p.grad = g
        fn()
        if sched is not None:
            sched.step()
    return params, opt, counter


def _windows(opt) -> list[torch.Tensor]:
    return [opt.histogram_rows(w).counts for w in ("step", "total")]


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_once_and_matches_eager(case):
    cls, kwargs = _cls(case), CASES[case]
    sched = isinstance(kwargs["lr"], torch.Tensor)
    p_eager, o_eager, _ = _run(cls, kwargs, None, scheduler=sched)
    p_comp, o_comp, counter = _run(cls, kwargs, "aot_eager", scheduler=sched)
    assert counter.frame_count == 1, f"{case}: {counter.frame_count} compilations over {STEPS} steps"
    for a, b in zip(_windows(o_comp), _windows(o_eager), strict=True):
        assert torch.equal(a, b), f"{case}: compiled histograms differ from the eager ones"
    assert int(_windows(o_comp)[1].sum()) == STEPS * sum(p.numel() for p in p_comp)
    base = _torch_cls(case)
    if base is None:  # the opaque operator runs the eager update itself
        expected = p_eager
    else:
        expected, _, torch_counter = _run(base, kwargs, "aot_eager", scheduler=sched)
        assert torch_counter.frame_count == 1
    for p, e in zip(p_comp, expected, strict=True):
        assert torch.equal(p, e), f"{case}: compiled update differs from the reference's"
    for a, b in zip(p_comp, p_eager, strict=True):  # and torch's compiled-vs-eager rounding is small
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad", "adabelief"])
def test_float_lr_scheduler_recompiles_no_more_than_torch(name):
    """A float lr changed by a scheduler: torch's compiled optimizers recompile once (the
    float becomes a graph input), and so does fasthist; never once per value."""
    cls = BY_NAME[name].cls
    _, _, counter = _run(cls, {"lr": 1e-2}, "eager", steps=35)
    torch_count = (
        2 if name == "adabelief" else _run(BY_NAME[name].reference, {"lr": 1e-2}, "eager", steps=35)[2].frame_count
    )
    assert counter.frame_count <= torch_count <= 2, (counter.frame_count, torch_count)


@pytest.mark.parametrize("case", ["adam", "adabelief", "rmsprop"])
def test_inductor_matches_eager_histograms(case):
    """Inductor (what users get): compiles once, histograms exactly the eager ones, update
    exactly what inductor makes of torch's own optimizer."""
    cls, kwargs = _cls(case), CASES[case]
    steps = 12
    _, o_eager, _ = _run(cls, kwargs, None, steps=steps)
    p_comp, o_comp, counter = _run(cls, kwargs, "inductor", steps=steps)
    assert counter.frame_count == 1
    for a, b in zip(_windows(o_comp), _windows(o_eager), strict=True):
        assert torch.equal(a, b)
    base = _torch_cls(case)
    if base is not None:
        expected, _, _ = _run(base, kwargs, "inductor", steps=steps)
        for p, e in zip(p_comp, expected, strict=True):
            assert torch.equal(p, e)


def test_bias_correction_op_is_the_eager_value():
    """The compiled step divides by the float32 rounding of the eager float64 host value,
    for thousands of steps and several beta2 (one code path computes both)."""
    from fasthist.reference.adam import _bias_correction2_sqrt_op, bias_correction2_sqrt

    steps = [torch.tensor(float(s)) for s in range(1, 5001)]
    for beta2 in (0.999, 0.99, 0.95, 0.9999, 0.5):
        eager = torch.tensor(bias_correction2_sqrt(steps, beta2), dtype=torch.float32)
        assert torch.equal(_bias_correction2_sqrt_op(steps, beta2, None), eager)
        assert torch.equal(_bias_correction2_sqrt_op(steps, 0.0, torch.tensor(beta2, dtype=torch.float64)), eager)


def test_compiled_step_keeps_state_dict_and_queries():
    """After compiled steps the optimizer is an ordinary one: queries, state_dict round trip."""
    params, opt, counter = _run(fasthist.Adam, {"lr": torch.tensor(1e-2)}, "aot_eager", steps=5)
    fresh = fasthist.Adam([p.detach().clone().requires_grad_() for p in params], lr=torch.tensor(1e-2))
    fresh.load_state_dict(opt.state_dict())
    for a, b in zip(_windows(fresh), _windows(opt), strict=True):
        assert torch.equal(a, b)
    assert opt.histogram(window="total").count == 5 * sum(p.numel() for p in params)


def _toy_update(params, grads, bufs, state_steps, *, lr, rho, flip=None, found_inf=None):
    """A heavy-ball step with flags of its own: what a newly declared optimizer brings."""
    for p, g, b, s in zip(params, grads, bufs, state_steps, strict=True):
        s.add_(1)
        b.mul_(rho).add_(g)
        p.add_(b, alpha=lr if flip else -lr)


TOY = OptimizerDecl(
    name="toy_heavy_ball",
    lists=("params", "grads", "bufs", "state_steps"),
    value="|buf|",
    update=_toy_update,
    hist_inputs=lambda lists, kwargs: ([b.abs() for b in lists[2]], [1.0] * len(lists[2]), None),
    sqrt=False,
    bools=frozenset({"flip"}),
    floats=frozenset({"lr", "rho"}),
    tensors=frozenset({"found_inf"}),
)


def test_operator_schema_follows_from_the_declaration():
    """A declaration nobody else knows gets its operator, typed from its lists and flags
    (no list of flags elsewhere): lists written in place but the gradients, the windows
    written, one slot per bool and tensor, three per float (constant, carried, Tensor)."""
    from fasthist import compiled

    schema = compiled.op(TOY)._opoverload._schema
    args = {a.name: a for a in schema.arguments}
    assert list(args) == [
        "backend",
        *("params", "grads", "bufs", "state_steps"),
        *("hist_step", "hist_total", "hist_rows", "hist_bins"),
        "flip",
        "found_inf",
        *("lr", "lr_float", "lr_tensor", "rho", "rho_float", "rho_tensor"),
    ]
    written = {n for n, a in args.items() if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"params", "bufs", "state_steps", "hist_step", "hist_total"}
    types = {n: str(a.type) for n, a in args.items()}
    assert {types[n] for n in ("params", "grads", "bufs", "state_steps")} == {"List[Tensor]"}
    assert types["flip"] == "Optional[bool]" and types["found_inf"] == "Optional[Tensor]"
    assert (types["lr"], types["lr_float"], types["lr_tensor"]) == ("Optional[float]", *["Optional[Tensor]"] * 2)
    assert types["hist_bins"] == "List[int]"


def test_declared_operator_runs_the_eager_call_compiled():
    """The toy's operator under ``torch.compile``: one compilation while its Tensor ``lr``
    changes every step (its float ``rho`` carried as a tensor), and the parameters, buffers
    and both windows bit for bit those of the eager call (the operator runs it)."""
    from fasthist import backend, compiled
    from fasthist.target import HistTarget

    def make():
        torch.manual_seed(0)
        lists = [[torch.randn(5, 3)], [torch.randn(5, 3)], [torch.zeros(5, 3)], [torch.zeros(())]]
        bins = fasthist.LogBins()
        windows = [torch.zeros(1, bins.num_bins, dtype=torch.int64) for _ in range(2)]
        return lists, HistTarget(bins, *windows, torch.zeros(1, dtype=torch.int64)), torch.tensor(0.1)

    def call(lists, hist, lr, run):
        run(TOY, backend.TORCH, lists, hist, {"lr": lr, "rho": 0.5, "flip": True})

    torch._dynamo.reset()
    compiled.op(TOY)  # as an optimizer does at construction: never defined inside a trace
    counter = CompileCounterWithBackend("aot_eager")
    traced = torch.compile(lambda lists, hist, lr: call(lists, hist, lr, compiled.functional_), backend=counter)
    (got, got_hist, got_lr), (want, want_hist, want_lr) = make(), make()
    for _ in range(4):
        traced(got, got_hist, got_lr)
        call(want, want_hist, want_lr, lambda decl, name, *a: backend.run(name, decl, *a))
        got_lr.mul_(0.5), want_lr.mul_(0.5)
    assert counter.frame_count == 1
    got_all = [t for lst in got for t in lst] + [got_hist.step, got_hist.total]
    want_all = [t for lst in want for t in lst] + [want_hist.step, want_hist.total]
    for a, b in zip(got_all, want_all, strict=True):
        assert torch.equal(a, b)
    assert int(got_hist.total.sum()) == 4 * 15
