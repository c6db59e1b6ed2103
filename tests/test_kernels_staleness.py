"""Staleness histogrammed by the fused Adam/AdamW kernel in the same launch as sqrt(v_hat).

Per element ``s = |g| / max(x, eps)``, ``x`` the sqrt(v_hat) value the kernel bins, ``g``
the float32 gradient as the kernel feeds it into ``v`` (unscaled, negated for maximize,
with coupled weight decay ``fma(p, wd, g)``, unrounded for bfloat16 parameters too). The
kernel launchers are called directly (as :mod:`fasthist.backend` calls them) with a
:class:`~fasthist.target.HistTarget` carrying staleness windows, and compared with:

- an oracle in pure torch from the call's inputs (``g`` before, ``v`` after), exact: every
  rounding is done in float64 where it is innocuous (sqrt and division: 53 >= 2 * 24 + 2
  bits) or emulated exactly (the fused multiply-add of coupled weight decay), so both
  windows of staleness are compared with ``torch.equal``;
- the same launch without staleness: parameters, states and the sqrt(v_hat) windows
  bit-identical (``torch.equal``), so tracking staleness changes nothing else.

A small launch shape (256-element chunks) puts full chunks, a partial last chunk and
several programs per tensor into tensors the interpreter steps quickly.
"""

from __future__ import annotations

import math

import pytest
import torch
from _kernel_helpers import (  # before triton
    BINS,
    DEVICE,
    INTERPRETING,
    ON_CPU,
    compile_without_a_gpu,
    fma32,
    on_triton,
)

triton = pytest.importorskip("triton")

from fasthist.reference.adam import bias_correction2_sqrt  # noqa: E402
from fasthist.target import HistTarget  # noqa: E402

kernels = pytest.importorskip("fasthist.kernels")
K = pytest.importorskip("fasthist.kernels.adam")
from fasthist.kernels import _common  # noqa: E402
from fasthist.kernels.adagrad import adagrad_hist  # noqa: E402

if ON_CPU and not INTERPRETING:
    pytest.skip("fasthist.kernels needs TRITON_INTERPRET=1 on a machine without CUDA", allow_module_level=True)

pytestmark = pytest.mark.interpreter if ON_CPU else []

BLOCK, ITERS = 128, 2  # chunk 256: the smallest block 4 warps take
# full chunks (256, 512), a partial last chunk (300 = 256 + 44, 515), a lone element, a 2-d
# tensor inside one masked block
SHAPES = [(300,), (256,), (1,), (5, 7), (515,)]


@pytest.fixture(autouse=True)
def small_chunks():
    _common.configure(block=BLOCK, iters=ITERS, num_warps=4)
    try:
        yield
    finally:
        _common.configure()


# -- the oracle ---------------------------------------------------------------------------
def _staleness_counts(g_eff: torch.Tensor, v_den: torch.Tensor, c: float, eps: float) -> torch.Tensor:
    """Counts of ``|g| / max(x, eps)``, ``x = fl32(fl32(sqrt(v)) / fl32(c))``, in float32."""
    root = v_den.double().sqrt().float().double()
    x = (root / float(torch.tensor(c, dtype=torch.float32))).float()
    m = torch.maximum(x, torch.tensor(eps, dtype=torch.float32))  # NaN x stays NaN
    s = (g_eff.double().abs() / m.double()).float()
    return BINS.count(s)


def _grad_as_it_enters_v(g, p, *, grad_scale, maximize, weight_decay, decoupled):
    g = g.float()
    if grad_scale is not None:
        g = g / grad_scale.float()
    if maximize:
        g = -g
    if weight_decay != 0 and not decoupled:
        g = fma32(p.float(), weight_decay, g)
    return g


class Run:
    """One set of tensors stepped twice per call: with staleness windows and without, from
    identical copies."""

    def __init__(self, shapes, dtype, amsgrad, seed):
        gen = torch.Generator().manual_seed(seed)
        self.gen, self.dtype, self.amsgrad = gen, dtype, amsgrad
        params = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in shapes]
        self.lists = [self._fresh(params), self._fresh(params)]  # tracked, untracked
        n = len(shapes)
        self.targets = [self._target(n, staleness=True), self._target(n, staleness=False)]
        self.expected = torch.zeros(n, BINS.num_bins, dtype=torch.int64)
        self.expected_total = self.expected.clone()

    def _fresh(self, params):
        z = [torch.zeros_like(p) for p in params]
        return {
            "params": [p.clone() for p in params],
            "exp_avgs": [t.clone() for t in z],
            "exp_avg_sqs": [t.clone() for t in z],
            "max_exp_avg_sqs": [t.clone() for t in z] if self.amsgrad else [],
            "state_steps": [torch.tensor(0.0) for _ in params],
        }

    @staticmethod
    def _target(n, staleness):
        z = torch.zeros(n, BINS.num_bins, dtype=torch.int64, device=DEVICE)
        rows = torch.arange(n - 1, -1, -1, device=DEVICE)  # permuted: tensor i writes row n-1-i
        return HistTarget(BINS, z, z.clone(), rows, staleness=(z.clone(), z.clone()) if staleness else None)

    def grads(self, make=None):
        ps = self.lists[0]["params"]
        gs = [make(p) if make else torch.randn(p.shape, generator=self.gen).to(DEVICE, self.dtype) for p in ps]
        return gs

    def step(self, grads, *, skipped=False, **kw):
        """Both launches, then the oracle of this step added to the expected windows."""
        p_before = [p.clone() for p in self.lists[0]["params"]]
        for d, target in zip(self.lists, self.targets, strict=True):
            args = (d["params"], [g.clone() for g in grads], d["exp_avgs"], d["exp_avg_sqs"], d["max_exp_avg_sqs"])
            on_triton(K.adam_hist)(*args, d["state_steps"], hist=target, **hyper(amsgrad=self.amsgrad, **kw))
        if skipped:
            return
        d = self.lists[0]
        v_den = d["max_exp_avg_sqs"] if self.amsgrad else d["exp_avg_sqs"]
        cs = bias_correction2_sqrt(d["state_steps"], kw.get("beta2", 0.999))
        rows = []
        for g, p, v, c in zip(grads, p_before, v_den, cs, strict=True):
            g_eff = _grad_as_it_enters_v(
                g.cpu(),
                p.cpu(),
                grad_scale=kw.get("grad_scale"),
                maximize=kw.get("maximize", False),
                weight_decay=kw.get("weight_decay", 0.0),
                decoupled=kw.get("decoupled_weight_decay", False),
            )
            rows.append(_staleness_counts(g_eff, v.cpu(), c, kw.get("eps", 1e-8)))
        self.expected = torch.stack(rows)
        self.expected_total += self.expected

    def check(self):
        tracked, untracked = self.targets
        rows = tracked.rows.cpu()
        step, total = (w.cpu()[rows] for w in tracked.staleness)
        assert torch.equal(step, self.expected), "staleness step window differs from the oracle"
        assert torch.equal(total, self.expected_total), "staleness total window differs from the oracle"
        assert torch.equal(tracked.step, untracked.step), "sqrt(v_hat) step window changed by tracking staleness"
        assert torch.equal(tracked.total, untracked.total), "sqrt(v_hat) total window changed by tracking staleness"
        for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"):
            for a, b in zip(self.lists[0][name], self.lists[1][name], strict=True):
                assert torch.equal(_bits(a), _bits(b)), f"{name} changed by tracking staleness"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` (NaN payloads and signed zeros compared too)."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def hyper(**over):
    kw = dict(
        amsgrad=False,
        has_complex=False,
        beta1=0.9,
        beta2=0.999,
        lr=1e-2,
        weight_decay=0.0,
        eps=1e-8,
        maximize=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        fused=None,
        grad_scale=None,
        found_inf=None,
        decoupled_weight_decay=False,
    )
    kw.update(over)
    return kw


# -- against the oracle -------------------------------------------------------------------
CASES = {  # (dtype, amsgrad, hyper-parameters)
    "adam": (torch.float32, False, {}),
    "adam-wd-amsgrad": (torch.float32, True, {"weight_decay": 0.1}),  # coupled: g = fma(p, wd, g)
    "adamw-wd-amsgrad": (torch.float32, True, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    "adam-maximize-eps": (torch.float32, False, {"maximize": True, "eps": 1e-2}),  # eps above most x
    "adam-bf16-wd": (torch.bfloat16, False, {"weight_decay": 0.1, "eps": 1e-4}),  # g in float32, unrounded
    "adamw-bf16-amsgrad": (torch.bfloat16, True, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_staleness_matches_the_oracle(name):
    dtype, amsgrad, kw = CASES[name]
    run = Run(SHAPES, dtype, amsgrad, seed=len(name))
    for scale in (1.0, 1e-3, 10.0):  # a step with small grads: v-hat now overstates them
        run.step([g * scale for g in run.grads()], **kw)
        run.check()


def test_grad_scale_and_found_inf():
    """Unscaled gradients feed the staleness (g / scale); a step skipped by found_inf leaves
    both staleness windows (and everything else) as they were."""
    run = Run(SHAPES, torch.float32, False, seed=3)
    scale = torch.tensor(1024.0, device=DEVICE)
    run.step([g * 1024 for g in run.grads()], grad_scale=scale, found_inf=torch.zeros((), device=DEVICE))
    run.check()
    before = [w.clone() for w in run.targets[0].staleness]
    run.step(run.grads(), skipped=True, grad_scale=scale, found_inf=torch.ones((), device=DEVICE))
    run.check()
    assert all(torch.equal(a, b) for a, b in zip(run.targets[0].staleness, before, strict=True))


@pytest.mark.parametrize("eps", [1e-8, 0.0])  # eps 0: x = 0 divides, 0/0 is NaN, g/0 is inf
def test_zeros_subnormals_and_nonfinite_grads(eps):
    """±0, subnormal, huge, ±inf and NaN gradients: each lands in the bin the oracle's
    IEEE float32 quotient does (zero, below range, above range, non-finite)."""
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 1e-39, 3e38, -3e38, math.inf, -math.inf, math.nan, 1.0, -2.5])
    run = Run(SHAPES, torch.float32, True, seed=5)

    def make(p):
        g = torch.randn(p.shape, generator=run.gen)
        flat = g.view(-1)
        flat[: min(flat.numel(), special.numel())] = special[: flat.numel()]
        if flat.numel() > 280:  # also inside a full chunk, in lanes a vector load covers
            flat[270 : 270 + special.numel()] = special
        return g.to(DEVICE)

    for _ in range(2):
        run.step(run.grads(make), eps=eps)
        run.check()


def test_tl_histogram_strategy_counts_both():
    """The fallback strategy (``tl.histogram``, packed the same way) counts what the words do."""
    _common.configure(block=BLOCK, iters=ITERS, num_warps=4, histogram="tl")
    run = Run(SHAPES, torch.float32, False, seed=7)
    run.step(run.grads(), weight_decay=0.1)
    run.check()
    assert run.targets[0].marks[HistTarget.STRATEGY] == "tl.histogram"


def test_a_program_counting_past_32k_in_each_half():
    """A program of 65,408 elements (128 x 511, the largest chunk under the limit), 40,000 of
    them in one bin of each quantity: each half of that word holds 40,000, past 32,767 (the
    high half then sets the word's sign bit), and both are flushed whole."""
    _common.configure(block=128, iters=511, num_warps=4)
    run = Run([(40_000,)], torch.float32, False, seed=11)
    run.step(run.grads(lambda p: torch.full(p.shape, 0.5, device=DEVICE)))  # every x and s alike
    run.check()
    assert run.targets[0].staleness[0].max() == 40_000 and run.targets[0].step.max() == 40_000


# -- what the kernels refuse, and say -----------------------------------------------------
def test_who_tracks_staleness():
    assert kernels.tracks_staleness("adam") and kernels.tracks_staleness("rmsprop")
    assert not any(kernels.tracks_staleness(m) for m in ("adagrad", "adabelief"))


def test_kernels_without_staleness_refuse_it():
    p = [torch.randn(10, device=DEVICE)]
    target = Run._target(1, staleness=True)
    with pytest.raises(ValueError, match="Invalid hist.staleness"):
        adagrad_hist(
            p,
            [torch.randn(10, device=DEVICE)],
            [torch.zeros(10, device=DEVICE)],
            [torch.tensor(1.0)],
            hist=target,
            lr=0.1,
            weight_decay=0.0,
            lr_decay=0.0,
            eps=1e-10,
            maximize=False,
        )
    assert torch.equal(target.step, torch.zeros_like(target.step))


def test_staleness_windows_unlike_the_step_window_are_refused():
    run = Run([(3,)], torch.float32, False, seed=2)
    step = run.targets[0].step
    run.targets[0].staleness = (step.clone(), torch.zeros(step.shape[0] + 1, step.shape[1], dtype=torch.int64))
    with pytest.raises(RuntimeError, match="staleness windows must be"):
        run.step(run.grads())


def test_a_chunk_the_halves_cannot_count_is_refused():
    """Both quantities count in 16-bit halves of one word: a program of 65,536 elements or
    more could carry one into the other, so such a launch shape is refused for staleness."""
    _common.configure(block=4096, iters=16, num_warps=4)
    run = Run([(3,)], torch.float32, False, seed=1)
    with pytest.raises(ValueError, match="Invalid launch shape for staleness"):
        run.step(run.grads())


# -- compiled for sm_90 without a GPU -----------------------------------------------------
_COMPILE_SCRIPT = r"""
import os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, "bench")
import sass_report as S
from fasthist.bins import LogBins
C = S.C
layout = C.bin_layout(C.BinSpec(LogBins()).kwargs(), C.SHAPE.num_warps)
(body, flags), _ = S.KERNELS["adam"]
per_thread = C.SHAPE.block // (32 * C.SHAPE.num_warps)


def compiled(staleness, **over):
    kw = dict(C.constexprs(body, flags, S.tl.float32, layout._replace(**{k: v for k, v in over.items() if k in layout._fields}),
                           hist=C.HIST_SHARED, staleness=staleness))
    kw.update({k: v for k, v in over.items() if k not in layout._fields})
    return S.compile_kernel(kw, 90, C.SHAPE.num_warps)


def problems(ck):
    return C.shared_histogram_problems(ck.asm["ptx"], ck.asm["ttgir"], ck.metadata.shared, layout.DUMP, layout.SLAB)


plain, tracked = compiled(False), compiled(True)
assert problems(tracked) == [], problems(tracked)
ptx, base = tracked.asm["ptx"], plain.asm["ptx"]
# staleness: one more correctly rounded division per element, in the full-chunk and tail loops
assert ptx.count("div.rn.f32") - base.count("div.rn.f32") == 2 * per_thread, (ptx.count("div.rn.f32"), base.count("div.rn.f32"))
assert "div.approx" not in ptx and "div.full" not in ptx
# and one increment of a word's high half per element, in both loops
assert ptx.count("red.shared.add.u32 [%fh_a], 65536") == 2 * per_thread
assert ptx.count("red.shared.add.u32 [%fh_a], 1;") == base.count("red.shared.add.u32 [%fh_a], 1;") == 2 * per_thread
assert tracked.metadata.shared == plain.metadata.shared  # the same words, no second region
# the guard's rules hold for the paired kernel too: a replicated block is refused
bad = compiled(True, BLOCK=64, ITERS=16)
found = C.shared_histogram_problems(bad.asm["ptx"], bad.asm["ttgir"], bad.metadata.shared, layout.DUMP, layout.SLAB)
assert [p.split(":")[0] for p in found] == ["replicated increment"], found
print("ok")
"""


def test_compiled_staleness_kernel_passes_the_guard_and_divides_correctly_rounded():
    """sm_90 compile with the installed Triton: the staleness kernel passes the structural
    guard, shares the sqrt(v_hat) words (same shared memory), divides with ``div.rn.f32``
    (never an approximate division), counts each element once in each half, and a
    replicated block is still refused."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        compile_without_a_gpu(_COMPILE_SCRIPT, timeout=900)
    finally:
        os.chdir(cwd)
