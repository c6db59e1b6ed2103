"""The staleness histograms (``track=("sqrt_v", "staleness")``) against an oracle written here
in plain torch from ``opt.state`` after the step and the parameters and gradients captured
before it: ``s = |g| / max(sqrt(v_hat), eps)``, with ``g`` as torch's Adam feeds it to ``v``.
Histograms compare exactly (``torch.equal``): every backend bins by the float's bits, and the
oracle rounds as the definition says (one float32 IEEE division; float64 for float64)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from _kernel_helpers import assert_ran, fma32
from torch import Tensor

import fasthist
from fasthist.backend import CPU_HISTOGRAM, FUSED_CPU, TORCH, TRITON

BOTH = ("sqrt_v", "staleness")
# a matrix with a zero row (zero gradients: s = 0, or wd * p / eps), a vector, an odd 3-d
# shape, a 0-d scalar
SHAPES = [(6, 5), (11,), (3, 2, 2), ()]
STEPS = 4


def _grads(step: int, dtype: torch.dtype, shapes=SHAPES) -> list[Tensor]:
    """Gradients spanning 8 decades, so the staleness fills many bins; a zero row."""
    g = torch.Generator().manual_seed(200 + step)
    out = []
    for s in shapes:
        gr = torch.randn(s, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(s, generator=g) * 8 - 7)
        if len(s) == 2:
            gr[0] = 0.0
        out.append(gr.to(dtype))
    return out


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _entering(p: Tensor, grad: Tensor, group: dict, grad_scale: Tensor | None) -> Tensor:
    """``g`` as torch's Adam feeds it to ``v``: its functional form (parameter's dtype), or its
    fused kernel (float32 math, ``fma(p, wd, g)`` rounded once)."""
    wd = 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]
    if group["fused"]:
        g = grad.to(_wide(p.dtype))
        if grad_scale is not None:
            g = g / grad_scale.to(g.dtype)
        g = -g if group["maximize"] else g
        if wd:
            g = fma32(p, wd, g) if g.dtype == torch.float32 else p.double() * wd + g
        return g
    g = -grad if group["maximize"] else grad
    return g.add(p, alpha=wd) if wd else g


def _sqrt_v_hat(state: dict, group: dict) -> Tensor:
    """``float32(sqrt_rn(v)) / float32(sqrt(1 - beta2**t))`` (float64 throughout for float64;
    a float64 sqrt rounds to float32 without double-rounding error: 53 >= 2*24 + 2 bits)."""
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    c = (1 - group["betas"][1] ** float(state["step"])) ** 0.5
    if v.dtype == torch.float64:  # numpy's sqrt is correctly rounded; torch's CPU float64 one can be 1 ulp off
        return torch.as_tensor(np.sqrt(v.numpy())) / c
    return v.double().sqrt().float() / torch.tensor(c, dtype=torch.float32)


def _expected(bins, p_before: Tensor, grad: Tensor, state: dict, group: dict, grad_scale) -> Tensor:
    a = _entering(p_before, grad, group, grad_scale).abs().to(_wide(p_before.dtype))
    x = _sqrt_v_hat(state, group)
    eps = torch.tensor(group["eps"], dtype=x.dtype)
    return bins.count(a / torch.maximum(x, eps))


def _run(
    cls, config: dict, dtype=torch.float32, backend="reference", skip_at=None, steps=STEPS, check=True, shapes=SHAPES
):
    """``steps`` steps of ``cls`` tracking staleness, each step's staleness histogram (and the
    total) compared with the oracle; returns (params, optimizer)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    opt = cls(params, track=BOTH, **config)
    total = [torch.zeros(opt.bins.num_bins, dtype=torch.int64) for _ in params]
    last = [torch.zeros(opt.bins.num_bins, dtype=torch.int64) for _ in params]
    for step in range(steps):
        grads = _grads(step, dtype, shapes)
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        scale = None
        if skip_at is not None:  # what a GradScaler sets on a fused optimizer
            scale = opt.grad_scale = torch.tensor(4.0)
            opt.found_inf = torch.tensor(1.0 if step == skip_at else 0.0)
        before = [p.detach().clone() for p in params]
        with fasthist.backend.use(backend):
            opt.step()
        if not check:
            continue
        group = opt.param_groups[0]
        for i, p in enumerate(params):
            if step != skip_at:
                last[i] = _expected(opt.bins, before[i], grads[i], opt.state[p], group, scale)
                total[i] = total[i] + last[i]
            got = opt.histogram(p, window="step", quantity="staleness").counts
            assert torch.equal(got, last[i]), (step, i)
    if check:
        for i, p in enumerate(params):
            assert torch.equal(opt.histogram(p, window="total", quantity="staleness").counts, total[i])
    return params, opt


def _ran(opt) -> set[str]:
    return {c.backend for c in opt.backends().values()}


ADAM_CONFIGS = {
    "defaults": {},
    "weight_decay": {"weight_decay": 0.1},
    "amsgrad": {"amsgrad": True, "weight_decay": 0.05},
    "maximize": {"maximize": True, "weight_decay": 0.1},  # -grad + wd * p: the sign matters
    "foreach": {"foreach": True, "weight_decay": 0.1, "maximize": True},
    "eps": {"eps": 1e-3},  # many elements below eps: s = |g| / eps
}


@pytest.mark.parametrize("config", ADAM_CONFIGS.values(), ids=ADAM_CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_adam_staleness_matches_oracle_reference(config, dtype):
    _, opt = _run(fasthist.Adam, config, dtype, backend="reference")
    assert _ran(opt) == {TORCH}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["weight_decay", "amsgrad", "maximize"])
def test_adam_staleness_matches_oracle_cpu_histogram(config, dtype):
    _, opt = _run(fasthist.Adam, ADAM_CONFIGS[config], dtype, backend="torch")
    assert _ran(opt) == {CPU_HISTOGRAM}, opt.backends()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_adamw_staleness_matches_oracle(backend, dtype):
    _, opt = _run(fasthist.AdamW, {"weight_decay": 0.1, "amsgrad": True}, dtype, backend=backend)
    expected = TORCH if backend == "reference" or dtype == torch.float64 else CPU_HISTOGRAM
    assert _ran(opt) == {expected}, opt.backends()


@pytest.mark.parametrize("cls", [fasthist.Adam, fasthist.AdamW])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fused_with_grad_scaler_skip(cls, backend):
    """fused=True with GradScaler's grad_scale/found_inf: g is unscaled, the skipped step
    leaves both staleness windows alone, on the fused CPU step too."""
    _, opt = _run(cls, {"fused": True, "weight_decay": 0.1}, backend=backend, skip_at=2)
    assert_ran(opt, FUSED_CPU if backend == "torch" else TORCH)


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX2"), reason="torch's x86 kernels contract to an fma"
)
def test_fused_entering_grad_is_what_torchs_fused_step_feeds_v():
    """The reference's fused ``g`` is torch's fused step's, bit for bit: ``exp_avg`` after one
    step with beta1 = 0 is ``g`` exactly. The first element is a float64 sum on a float32 tie:
    1 + 2**-23 + 2**-24 - 2**-70 rounds to 1 + 2**-23 once (an fma), to 1 + 2**-22 twice."""
    from fasthist.reference.adam import adam_entering_grads

    wd = 2.0**-24 * (1 - 2.0**-23)
    gen = torch.Generator().manual_seed(3)
    p = torch.cat([torch.tensor([1 + 2.0**-23]), torch.randn(4095, generator=gen)]).requires_grad_()
    grad = torch.cat([torch.tensor([1 + 2.0**-23]), torch.randn(4095, generator=gen) * 1e-7])
    kwargs = {"fused": True, "weight_decay": wd, "maximize": False}
    (expected,) = adam_entering_grads([[p.detach().clone()], [grad.clone()]], kwargs)
    p.grad = grad
    opt = torch.optim.Adam([p], betas=(0.0, 0.5), weight_decay=wd, fused=True)
    opt.step()
    assert expected[0] == 1 + 2.0**-23
    assert torch.equal(expected, opt.state[p]["exp_avg"])


FUSED_CONFIGS = {
    "defaults": {},
    "weight_decay": {"weight_decay": 0.1},
    "amsgrad": {"amsgrad": True, "weight_decay": 0.05},
    "maximize": {"maximize": True, "weight_decay": 0.1},
    "eps": {"eps": 1e-3, "weight_decay": 0.1},  # many elements below eps: s = |g| / eps
}


@pytest.mark.parametrize("cls", [fasthist.Adam, fasthist.AdamW])
@pytest.mark.parametrize("config", FUSED_CONFIGS.values(), ids=FUSED_CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_cpu_step_bins_staleness_exactly(cls, config, dtype):
    """fused=True on CPU tensors: the compiled fused step bins the staleness in its own sweep
    (its g, fed to v, and the x it bins), equal to the oracle step by step."""
    _, opt = _run(cls, {"fused": True, **config}, dtype, backend="torch")
    assert_ran(opt, FUSED_CPU)


def test_fused_cpu_staleness_of_a_tensor_cut_between_threads():
    """A tensor split between two threads' ranges (partial counts merged after the sweep),
    with a small one beside it: both quantities' windows equal the oracle's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, opt = _run(
            fasthist.AdamW, {"fused": True, "amsgrad": True}, backend="torch", steps=2, shapes=[(300, 700), (5,)]
        )
    finally:
        torch.set_num_threads(threads)
    assert_ran(opt, FUSED_CPU)


def test_staleness_leaves_sqrt_v_and_the_update_alone():
    """Tracking staleness changes neither the parameters nor the sqrt(v_hat) histograms."""
    pa, a = _run(fasthist.Adam, {"weight_decay": 0.1}, backend="torch", check=False)
    g = torch.Generator().manual_seed(0)
    pb = [torch.randn(s, generator=g, dtype=torch.float64).float().requires_grad_() for s in SHAPES]
    b = fasthist.Adam(pb, weight_decay=0.1)
    for step in range(STEPS):
        for p, gr in zip(pb, _grads(step, torch.float32), strict=True):
            p.grad = gr
        b.step()
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    for window in ("step", "total"):
        ha, hb = a.histograms(window=window), b.histograms(window=window)
        assert all(torch.equal(ha[k].counts, hb[k].counts) for k in hb)


def test_per_group_track():
    """Only the group that tracks staleness has staleness rows, in the store and in queries."""
    w, v = torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    opt = fasthist.Adam([{"params": [w], "track": ["staleness", "sqrt_v"]}, {"params": [v]}], weight_decay=0.1)
    assert opt.param_groups[0]["track"] == BOTH and opt.param_groups[1]["track"] is True
    for _ in range(3):
        w.grad, v.grad = torch.randn(4, 3), torch.randn(5)
        before = w.detach().clone()
        opt.step()
    expected = _expected(opt.bins, before, w.grad, opt.state[w], opt.param_groups[0], None)
    assert list(opt.histograms(quantity="staleness")) == ["0.0"]
    assert torch.equal(opt.histogram(w, quantity="staleness").counts, expected)
    rows = opt._hist_store().counts
    assert "staleness_step" not in rows[v] and "staleness_total" in rows[w]
    assert set(opt.histograms()) == {"0.0", "1.0"}
    names, q = opt.quantiles([0.5, 0.99], quantity="staleness")
    assert names == ["0.0"] and q.shape == (1, 2)
    with pytest.raises(KeyError):
        opt.histogram(v, quantity="staleness")


@pytest.mark.parametrize(
    "track, match",
    [
        (("staleness",), "'sqrt_v' must be tracked"),
        (("sqrt_v", "stale"), "unknown quantity 'stale'"),
        ("staleness", "expected a bool or a tuple"),
        ((), "'sqrt_v' must be tracked"),
    ],
)
def test_bad_track_values(track, match):
    with pytest.raises(ValueError, match=f"Invalid track value: .*{match}"):
        fasthist.Adam([torch.zeros(2, requires_grad=True)], track=track)
    with pytest.raises(ValueError, match="Invalid track value"):
        fasthist.Adam([{"params": [torch.zeros(2, requires_grad=True)], "track": track}])


@pytest.mark.parametrize("cls, why", [(fasthist.Adagrad, "a sum"), (fasthist.AdaBelief, r"\(g - m\)")])
def test_optimizers_without_staleness_refuse_it(cls, why):
    with pytest.raises(ValueError, match=f"has no staleness: .*{why}"):
        cls([torch.zeros(2, requires_grad=True)], track=BOTH)
    assert "No staleness" in cls.__doc__


def test_query_of_an_untracked_quantity():
    p = torch.randn(3, requires_grad=True)
    opt = fasthist.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    for query in (
        lambda: opt.histograms(quantity="staleness"),
        lambda: opt.histogram(p, quantity="staleness"),
        lambda: opt.quantiles(0.5, quantity="staleness"),
        lambda: opt.histogram_rows("step", quantity="staleness"),
    ):
        with pytest.raises(ValueError, match="Invalid quantity: 'staleness' is not tracked"):
            query()
    with pytest.raises(ValueError, match="Invalid quantity: 'g'"):
        opt.histograms(quantity="g")


def _counts(opt, quantity: str) -> dict[str, Tensor]:
    return {
        k: h.counts for window in ("step", "total") for k, h in opt.histograms(window=window, quantity=quantity).items()
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trips(dtype):
    """Through a fasthist state dict, through torch.optim.Adam (which casts the rows to the
    parameter's dtype) and back, and through pickle: both quantities exact."""
    params, opt = _run(fasthist.Adam, {"weight_decay": 0.1}, dtype, backend="torch", check=False)
    want = {q: _counts(opt, q) for q in BOTH}
    sd = opt.state_dict()
    assert sd["state"][0]["staleness_step"].shape == (opt.bins.num_bins, 8)  # bytes, exact in any dtype
    fresh = fasthist.Adam(params, track=BOTH, weight_decay=0.1)
    fresh.load_state_dict(sd)
    assert all(_same(_counts(fresh, q), want[q]) for q in BOTH)
    plain = torch.optim.Adam(params, weight_decay=0.1)
    plain.load_state_dict(opt.state_dict())
    back = fasthist.Adam(params, weight_decay=0.1)
    back.load_state_dict(plain.state_dict())
    assert back.param_groups[0]["track"] == BOTH  # torch.optim keeps the group's options
    assert all(_same(_counts(back, q), want[q]) for q in BOTH)
    unpickled = pickle.loads(pickle.dumps(opt))
    assert all(_same(_counts(unpickled, q), want[q]) for q in BOTH)


def test_reset_histograms_resets_both():
    _, opt = _run(fasthist.Adam, {}, backend="torch", check=False)
    opt.reset_histograms()
    for q in BOTH:
        assert all(int(c.sum()) == 0 for c in _counts(opt, q).values())


def test_staleness_tracked_later_in_a_group():
    """A group switched to tracking staleness gets fresh staleness rows; its sqrt_v rows keep their counts."""
    p = torch.randn(4, requires_grad=True)
    opt = fasthist.Adam([p])
    p.grad = torch.ones(4)
    opt.step()
    before = opt.histogram(p, window="total").counts
    opt.param_groups[0]["track"] = BOTH
    p.grad = torch.full((4,), 2.0)
    opt.step()
    assert int(opt.histogram(p, window="total", quantity="staleness").counts.sum()) == 4
    assert int(opt.histogram(p, window="total").counts.sum()) == int(before.sum()) + 4


def test_staleness_rms_brackets_the_exact_rms():
    """opt.staleness_rms(): the exact RMS of the oracle's s lies in [lower, upper], and the
    estimate is within 2**-(m+1) of it (all values in range here)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    opt = fasthist.AdamW(params, track=BOTH, eps=1e-12)
    for step in range(STEPS):
        grads = _grads(step, torch.float32)
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        before = [p.detach().clone() for p in params]
        opt.step()
    names, rms = opt.staleness_rms()
    assert names == ["0.0", "0.1", "0.2", "0.3"] and rms.estimate.dtype == torch.float64
    group = opt.param_groups[0]
    for i, p in enumerate(params):
        a = _entering(before[i], grads[i], group, None).abs().float()
        s = a / torch.maximum(_sqrt_v_hat(opt.state[p], group), torch.tensor(1e-12))
        exact = s.double().square().mean().sqrt()
        assert rms.lower[i] <= exact <= rms.upper[i]
        assert abs(float(rms.estimate[i] / exact) - 1) < 2.0 ** -(opt.bins.mantissa_bits + 1)
    assert opt.staleness_rms(window="total")[1].estimate.shape == (4,)


@pytest.mark.parametrize("name", ["weight_decay", "amsgrad", "maximize"])
def test_triton_kernels_track_adam_staleness_exactly(name):
    """On the Triton kernels (the interpreter here), Adam's staleness is binned in the same
    launch as sqrt(v_hat), and equals the oracle from the optimizer's own state."""
    _, opt = _run(fasthist.Adam, ADAM_CONFIGS[name], backend="triton", steps=2)
    assert _ran(opt) == {TRITON}, opt.backends()


def test_triton_kernel_without_staleness_is_refused_with_a_reason(monkeypatch):
    """A kernel that histograms no staleness (every one that has an optimizer with a
    staleness does now; pretended here): the call runs on the next backend, and
    opt.backends() says why."""
    monkeypatch.setattr(fasthist.backend.kernels_module(), "tracks_staleness", lambda module: False)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    opt = fasthist.RMSprop(params, track=BOTH)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    with fasthist.backend.use("triton"):
        opt.step()
    (choice,) = opt.backends().values()
    assert choice.backend == CPU_HISTOGRAM and "triton: staleness: not in this backend yet" in choice.reason


def test_complex_adam_staleness():
    """Complex parameters: (re, im) pairs, as in the sqrt(v_hat) histogram."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(5, 3, generator=g, dtype=torch.complex64).requires_grad_()
    opt = fasthist.Adam([p], track=BOTH, weight_decay=0.1)
    for backend in ("reference", "torch"):
        p.grad = torch.randn(5, 3, generator=g, dtype=torch.complex64)
        before = p.detach().clone()
        with fasthist.backend.use(backend):
            opt.step()
        group, st = opt.param_groups[0], opt.state[p]
        a = torch.view_as_real(p.grad.add(before, alpha=0.1)).abs()
        c = torch.tensor((1 - 0.999 ** float(st["step"])) ** 0.5, dtype=torch.float32)
        x = torch.view_as_real(st["exp_avg_sq"]).double().sqrt().float() / c
        expected = opt.bins.count(a / torch.maximum(x, torch.tensor(group["eps"])))
        assert torch.equal(opt.histogram(p, quantity="staleness").counts, expected), backend
    assert _ran(opt) == {CPU_HISTOGRAM}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize(
    "config", [{"weight_decay": 0.1, "maximize": True}, {"centered": True, "momentum": 0.9, "foreach": True}]
)
def test_rmsprop_staleness_matches_oracle(config, backend, dtype):
    """RMSprop: s = |g| / max(x, eps), x = sqrt(v) (centered: sqrt(v - grad_avg**2)), no bias
    correction; g as torch's op leaves it in the parameter's dtype, the division in float32."""
    if backend == "triton" and dtype == torch.bfloat16 and config.get("weight_decay"):
        # torch's CPU add(alpha=) rounds alpha to bfloat16 (bf16(0.1) = 0.10009765625); the
        # kernel multiplies by the float32 weight decay: the entering g, and so v and both
        # histograms, differ from the CPU reference by a bf16 ulp at times
        pytest.skip("bfloat16 weight decay: torch's CPU add(alpha=) rounds alpha to bfloat16, the kernel does not")
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]
    opt = fasthist.RMSprop(params, track=BOTH, **config)
    for step in range(STEPS):
        grads = _grads(step, dtype)
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        before = [p.detach().clone() for p in params]
        with fasthist.backend.use(backend):
            opt.step()
        group = opt.param_groups[0]
        for i, p in enumerate(params):
            gr = -grads[i] if group["maximize"] else grads[i]
            gr = gr.add(before[i], alpha=group["weight_decay"]) if group["weight_decay"] else gr
            st = opt.state[p]
            v = (
                st["square_avg"].addcmul(st["grad_avg"], st["grad_avg"], value=-1)
                if group["centered"]
                else st["square_avg"]
            )
            x = v.double().sqrt().float()
            expected = opt.bins.count(gr.abs() / torch.maximum(x, torch.tensor(group["eps"])))
            assert torch.equal(opt.histogram(p, quantity="staleness").counts, expected), (step, i)
    assert _ran(opt) == {{"reference": TORCH, "torch": CPU_HISTOGRAM, "triton": TRITON}[backend]}, opt.backends()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_step(compiler):
    """Under torch.compile: one compilation, and the staleness of the state the compiled step
    leaves, exactly (the compiled update's v may differ from the eager one by an ulp, which
    at step 1, where s = 1 up to rounding on a bin edge, moves elements across that edge:
    compare with the oracle of the compiled state, not with an eager run)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    opt = fasthist.Adam(params, lr=torch.tensor(1e-2), amsgrad=True, track=BOTH)
    counter = CompileCounterWithBackend(compiler)
    step = torch.compile(opt.step, backend=counter)
    for t in range(STEPS):
        grads = _grads(t, torch.float32)
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        with fasthist.backend.use("torch"):
            step()
        group = opt.param_groups[0]
        for i, p in enumerate(params):
            expected = _expected(opt.bins, p.detach(), grads[i], opt.state[p], group, None)  # no decay: g = grad
            assert torch.equal(opt.histogram(p, quantity="staleness").counts, expected), (t, i)
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "says, takes", [(None, False), (("fused_adagrad_hist_",), False), (("fused_adam_hist_",), True)]
)
def test_a_backend_takes_staleness_only_where_its_module_says_so(monkeypatch, says, takes):
    """``fasthist.csrc.TRACKS_STALENESS``: the fused CPU ops that bin staleness; a call whose
    op it does not name goes elsewhere, said why."""
    assert fasthist.csrc.TRACKS_STALENESS == ("fused_adam_hist_",)  # Adam's and AdamW's op bins it
    if says is None:
        monkeypatch.delattr(fasthist.csrc, "TRACKS_STALENESS")
    else:
        monkeypatch.setattr(fasthist.csrc, "TRACKS_STALENESS", says)
    _, opt = _run(fasthist.Adam, {"fused": True}, backend="torch", steps=1, check=not takes)
    (choice,) = opt.backends().values()
    assert (choice.backend == FUSED_CPU) == takes, choice
    assert ("staleness: not in this backend yet" in choice.reason) != takes
