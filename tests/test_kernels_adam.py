"""The fused Triton Adam/AdamW kernel against the reference backend.

On a CPU-only machine the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``,
set here before ``fasthist.kernels`` is first imported); with CUDA they run compiled and the
``gpu`` tests (bf16/fp16, CUDA-graph capture) run too.

What is compared, per step, over several steps:

- parameters: on the CPU bit-identical (``torch.equal``) to torch's own Adam run with a
  correctly rounded square root (``reference`` below, :class:`_kernel_helpers.IEEESqrt`);
  on CUDA within 2 ulp (torch's CUDA kernels round differently);
- ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``: bit-identical on CPU (the kernel rounds like
  torch's CPU kernels), within 2 ulp on CUDA;
- histograms (``step`` and ``total`` windows): exactly equal to the reference backend's on CPU,
  and everywhere exactly equal to an oracle computed in float64 from the kernel's own state
  (``x = fl32(sqrt(v)) / fl32(c)`` is correctly rounded through float64).

Why the CPU parameters are exact, on any x86-64 machine: torch's single-tensor Adam computes
``denom = (sqrt(v) / c).add_(eps)`` and ``p.addcdiv_(m, denom, value=-step_size)``, that is
``p + (-step_size * m) / denom`` (ATen's addcdiv, in its vectorised and its scalar loop
alike), one IEEE-rounded float32 operation at a time, with ``c``, ``step_size`` and ``eps``
rounded to float32 from Python floats. No two of these operations can be contracted into an
fma (each is its own kernel writing a float32 tensor; inside addcdiv the product feeds a
division). The kernel does the same operations in the same order on the same float32
constants, and the interpreter evaluates them with numpy's IEEE float32 operations. The one
operation that is *not* the same on every machine is torch's sqrt: ATen's CPU float32 sqrt
is MKL VML's ``vsSqrt`` (on every layout, even one element), which is not correctly rounded
(on an AMD EPYC with AVX2, 16% of results are 1 ulp from round-to-nearest) and takes a
code path MKL chooses per CPU at run time. With torch's own sqrt, one element of the 16,385
of ``test_sizes[chunk+1]`` lands 3 ulp from the kernel on such a machine and none on others;
with the correctly rounded one, none anywhere. The price: these tests no longer exercise
MKL's sqrt, which is torch's business, not the kernel's.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from _kernel_helpers import (  # before triton
    BINS,
    DEVICE,
    INTERPRETING,
    ON_CPU,
    assert_ran,
    assert_ulp,
    compile_without_a_gpu,
    ieee_sqrt,
    on_triton,
    same,
    target,
)

triton = pytest.importorskip("triton")

import fasthist  # noqa: E402
from fasthist import backend, dispatch  # noqa: E402
from fasthist.adam import ADAM  # noqa: E402
from fasthist.reference.adam import adam_reference, bias_correction2_sqrt  # noqa: E402

K = pytest.importorskip("fasthist.kernels.adam")
from fasthist.kernels import _common, _histogram  # noqa: E402

# torch's Adam in torch's order of operations, with a correctly rounded sqrt (see check())
reference = ieee_sqrt(adam_reference)

if ON_CPU and not INTERPRETING:
    pytest.skip("fasthist.kernels needs TRITON_INTERPRET=1 on a machine without CUDA", allow_module_level=True)

pytestmark = pytest.mark.interpreter if ON_CPU else []
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

B, C = _common.SHAPE.block, _common.SHAPE.chunk


# -- helpers ------------------------------------------------------------------------------
def oracle_counts(values: list[torch.Tensor], steps: list[torch.Tensor], beta2: float) -> torch.Tensor:
    """[n, num_bins] counts of fl32(sqrt(v)) / fl32(c), correctly rounded via float64."""
    c = bias_correction2_sqrt(steps, beta2)
    c = [float(x) for x in (c.cpu() if isinstance(c, torch.Tensor) else c)]
    rows = []
    for v, ci in zip(values, c, strict=True):
        v = torch.view_as_real(v) if v.is_complex() else v
        s = v.detach().cpu().double().sqrt().float().double()
        x = (s / float(torch.tensor(ci, dtype=torch.float32))).float()
        rows.append(BINS.count(x))
    return torch.stack(rows) if rows else torch.zeros(0, BINS.num_bins, dtype=torch.int64)


class Case:
    """One set of tensors, run by the kernel and by the reference on identical copies."""

    def __init__(self, shapes, *, dtype=None, amsgrad=False, steps_on_device=False, seed=0, make=None):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.dtype = dtype
        make = make or (lambda shape: torch.randn(shape, generator=gen, dtype=torch.float32))
        params = [make(s).to(DEVICE, dtype) if dtype is not None else make(s).to(DEVICE) for s in shapes]
        sdev = DEVICE if steps_on_device else torch.device("cpu")

        def state(p):
            return torch.zeros_like(p, memory_format=torch.preserve_format)

        self.k = {
            "params": params,
            "exp_avgs": [state(p) for p in params],
            "exp_avg_sqs": [state(p) for p in params],
            "max_exp_avg_sqs": [state(p) for p in params] if amsgrad else [],
            "state_steps": [torch.tensor(0.0, device=sdev) for _ in params],
        }
        self.r = {k: [t.clone() for t in v] for k, v in self.k.items()}
        self.gen = gen
        self.n = len(shapes)
        self.hk, self.hr = target(self.n), target(self.n)

    def grads(self, scale: float = 1.0):
        """Next step's gradients (kernel copy, reference copy). Each step starts the
        reference from the kernel's parameters and states, so every step is compared from
        identical inputs and 1-ulp differences (torch's CPU sqrt is not correctly rounded)
        do not accumulate across steps."""
        for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            for a, b in zip(self.k[name], self.r[name], strict=True):
                b.copy_(a)
        self.prev = [p.clone() for p in self.r["params"]]
        self.prev_state = {
            name: [t.clone() for t in self.r[name]] for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
        }
        gk = []
        for p in self.k["params"]:
            g = torch.randn(p.shape, generator=self.gen, dtype=torch.float64) * scale
            if p.is_complex():
                g = torch.complex(g, torch.randn(p.shape, generator=self.gen, dtype=torch.float64) * scale)
            g = g.to(DEVICE, p.dtype)
            if not p.is_contiguous():  # grads follow their parameter's layout, as autograd makes them
                g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
            gk.append(g)
        return gk, [g.clone() for g in gk]

    @staticmethod
    def args(d, grads):
        return (d["params"], grads, d["exp_avgs"], d["exp_avg_sqs"], d["max_exp_avg_sqs"], d["state_steps"])


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


def check(case: Case, *, p_ulp=None, state_exact=ON_CPU, hist_vs_reference=ON_CPU, beta2=0.999):
    """Compare the kernel's step with the reference's (module docstring). ``p_ulp``: None
    means bit-identical parameters on the CPU (2 ulp on CUDA); a number is a tolerance the
    caller argues for."""
    k, r = case.k, case.r
    for i, (a, b, prev) in enumerate(zip(k["params"], r["params"], case.prev, strict=True)):
        if p_ulp is None and ON_CPU:
            assert same(a, b), f"param {i} {tuple(a.shape)} differs from torch's Adam (correctly rounded sqrt)"
        else:
            assert_ulp(a, b, 2.0 if p_ulp is None else p_ulp, f"param {i} {tuple(a.shape)}", prev)
    for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (a, b) in enumerate(zip(k[name], r[name], strict=True)):
            if state_exact:
                assert same(a, b), f"{name}[{i}] {tuple(a.shape)} differs from the reference"
            else:
                # 2 ulp of the larger of the state and its change (the change's own rounding
                # survives a cancellation, see test_fused_reference_with_grad_scale)
                assert_ulp(a, b, 2.0, f"{name}[{i}]", case.prev_state[name][i])
    for a, b in zip(k["state_steps"], r["state_steps"], strict=True):
        assert float(a) == float(b)
    vals = k["max_exp_avg_sqs"] if k["max_exp_avg_sqs"] else k["exp_avg_sqs"]
    expected = oracle_counts(vals, k["state_steps"], beta2)
    rows = case.hk.rows.cpu()
    assert torch.equal(case.hk.step.cpu()[rows], expected), "step histograms differ from the float64 oracle"
    if hist_vs_reference:
        assert torch.equal(case.hk.step, case.hr.step), "step window differs from the reference backend"
        assert torch.equal(case.hk.total, case.hr.total), "total window differs from the reference backend"


def run_steps(case: Case, steps: int, **kw):
    ref_kw = dict(kw)
    for _ in range(steps):
        gk, gr = case.grads()
        on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper(**kw))
        reference(*Case.args(case.r, gr), hist=case.hr, **hyper(**ref_kw))
        check(case, beta2=kw.get("beta2", 0.999))


# -- sizes --------------------------------------------------------------------------------
SIZES = {
    "one": [(1,)],  # a single element: one masked lane survives
    "block-1": [(B - 1,)],  # last lane of the only block masked
    "block": [(B,)],  # exactly one full block, nothing masked
    "block+1": [(B + 1,)],  # second block has one live lane
    "chunk+1": [(C + 1,)],  # a second program for one element: two flushes into one row
    "prime": [(4093,)],  # prime near 4k: no alignment at all
    "2d": [(33, 65)],
    "3d": [(5, 7, 11)],
    "0-dim": [()],  # scalar parameter
    "empty": [(0,), (3, 0)],  # no elements: the step count still moves, histograms are empty
    "mixed": [(1,), (0,), (B + 1,), (17, 3), (), (4093,), (2, 2, 2)],
}


@pytest.mark.parametrize("name", list(SIZES))
def test_sizes(name):
    run_steps(Case(SIZES[name], seed=1), 3)


def test_small_launch_shape():
    """Another launch shape (block 256, 2 per program): many programs per tensor, each
    flushing into the same histogram row; results must not depend on the shape."""
    K.configure(block=256, iters=2, num_warps=4)
    try:
        run_steps(Case([(4093,), (513,), (1,), (7, 75)], amsgrad=True, seed=21), 2, amsgrad=True)
    finally:
        K.configure()
    assert (_common.SHAPE.block, _common.SHAPE.iters, _common.SHAPE.chunk) == (1024, 16, 16384)  # the defaults
    with pytest.raises(ValueError, match="block"):
        K.configure(block=1000)


def test_many_tensors_one_call():
    g = torch.Generator().manual_seed(7)
    shapes = [(int(n),) for n in torch.randint(0, 300, (60,), generator=g)]
    case = Case(shapes, seed=2)
    run_steps(case, 2, amsgrad=False)


# A tensor lr: torch computes step_size = lr / fl32(1 - beta1**t) as a float32 tensor op (two
# roundings), the kernel lr / (1 - beta1**t) in float64 rounded once to float32: the step
# sizes differ by rho <= 3u (u = 2**-24). The rest as DEVICE_STEP_ULP argues: rho + 4u of the
# update is under 7 ulp of it, plus 1 ulp of the sum.
TENSOR_LR_ULP = 8.0
FLAGS = list(itertools.product([False, True], [False, True], ["none", "coupled", "decoupled"], [False, True]))


@pytest.mark.parametrize(("amsgrad", "maximize", "wd", "tensor_lr"), FLAGS)
def test_flags(amsgrad, maximize, wd, tensor_lr):
    case = Case(SIZES["mixed"], amsgrad=amsgrad, seed=3)
    kw = dict(
        amsgrad=amsgrad,
        maximize=maximize,
        weight_decay=0.0 if wd == "none" else 0.1,
        decoupled_weight_decay=wd == "decoupled",
    )
    for step in range(3):
        lr = torch.tensor(1e-2 / (step + 1)) if tensor_lr else 1e-2 / (step + 1)
        gk, gr = case.grads()
        on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper(lr=lr, **kw))
        reference(*Case.args(case.r, gr), hist=case.hr, **hyper(lr=lr, **kw))
        check(case, p_ulp=TENSOR_LR_ULP if tensor_lr else None)


@pytest.mark.parametrize("betas", [(0.3, 0.9), (0.0, 0.5)])  # lerp from the end (weight >= 0.5)
def test_other_betas(betas):
    run_steps(Case(SIZES["mixed"], seed=4), 3, beta1=betas[0], beta2=betas[1])


def _strided_params():
    g = torch.Generator().manual_seed(5)
    return [
        torch.randn(40, 30, generator=g).to(DEVICE).t(),  # transposed: dense, walked in place
        torch.randn(20, 60, generator=g).to(DEVICE)[:, ::2],  # strided slice: copied, written back
        torch.randn(4, 6, 5, generator=g).to(DEVICE).permute(1, 2, 0),  # permuted 3-d: dense
    ]


def test_non_contiguous():
    case = Case([(1,)] * 3, seed=5)
    for d in (case.k, case.r):
        d["params"] = _strided_params()
        d["exp_avgs"] = [torch.zeros_like(p) for p in d["params"]]
        d["exp_avg_sqs"] = [torch.zeros_like(p) for p in d["params"]]
    assert not any(p.is_contiguous() for p in case.k["params"])
    ptrs = [p.data_ptr() for p in case.k["params"]]
    run_steps(case, 3)
    assert [p.data_ptr() for p in case.k["params"]] == ptrs  # updated in place


def test_misaligned_views():
    """Views starting 4 bytes into their storage: walked in place, without the 16-byte
    alignment hint (a wrong hint would be a misaligned vector access on the GPU)."""
    case = Case([(1,)] * 2, seed=22)
    for d in (case.k, case.r):
        g = torch.Generator().manual_seed(22)
        d["params"] = [
            torch.randn(C + 2, generator=g).to(DEVICE)[1:],
            torch.randn(100, generator=g).to(DEVICE)[1:].view(3, 33),
        ]
        d["exp_avgs"] = [torch.zeros_like(p) for p in d["params"]]
        d["exp_avg_sqs"] = [torch.zeros_like(p) for p in d["params"]]
    assert case.k["params"][0].data_ptr() % 16 != 0
    run_steps(case, 2)
    flags = [aligned for plan in _common.PLANS.values() for _, _, aligned in plan.groups]
    assert False in flags


def test_complex():
    def make(shape):
        return torch.randn(shape, dtype=torch.complex64)

    case = Case([(7,), (3, 5), ()], seed=6, make=make)
    run_steps(case, 3, has_complex=True, amsgrad=False)


def test_complex_amsgrad():
    case = Case([(9,), (2, 3)], seed=6, amsgrad=True, make=lambda s: torch.randn(s, dtype=torch.complex64))
    run_steps(case, 2, has_complex=True, amsgrad=True)


def test_steps_differ_between_tensors():
    case = Case([(5,), (B + 3,), (2, 2)], seed=8)
    for d in (case.k, case.r):
        d["state_steps"][1].fill_(10.0)
        d["state_steps"][2].fill_(3.0)
    run_steps(case, 2)


def test_nonfinite_and_extremes_counted():
    """inf/NaN gradients, huge and tiny values: every element lands in a bin, as torch does."""

    def make(shape):
        return torch.randn(shape)

    case = Case([(B + 5,)], seed=9, make=make)
    gk, gr = case.grads()
    for g in (gk[0], gr[0]):
        g[0], g[1], g[2], g[3], g[4], g[5] = float("inf"), float("nan"), 1e30, 1e-30, 0.0, -0.0
    on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper())
    reference(*Case.args(case.r, gr), hist=case.hr, **hyper())
    assert case.hk.step.sum() == B + 5
    assert case.hk.step[0, BINS.nonfinite] >= 2
    for a, b in zip(case.k["exp_avg_sqs"], case.r["exp_avg_sqs"], strict=True):
        assert same(a, b) if ON_CPU else True
    if ON_CPU:
        assert torch.equal(case.hk.step, case.hr.step)


# -- grad scaling, capturable, lr tensors -------------------------------------------------
# With the step counts on the device (capturable) the kernel computes step_size =
# lr / (1 - beta1**t) in float32 (torch.pow of fl32(0.9): within 1 ulp on any build, Sleef's
# u10 pow in the vectorised loop, libm's powf in the scalar one) where the reference computes
# it in float64. For t <= 3: |fl32(0.9)**t - 0.9**t| <= 3 * 2.4e-8, pow's error <= 6e-8, over
# 1 - 0.9**t >= 0.1, plus two float32 roundings: the step sizes differ by rho < 1e-6 < 17u
# (u = 2**-24). The rest of the update is the same operations on the same values (c comes
# from the host either way), each side rounding twice more (the product and the quotient,
# 4u together), and the final sum rounds once on each side (1 ulp). rho + 4u of the update is
# at most 21 ulp of it (u * |x| < ulp(x)), plus 1 ulp of the sum: 22 ulp of
# max(|p|, |update|). Measured on an AMD EPYC: 6.
DEVICE_STEP_ULP = 22.0


@pytest.mark.parametrize("steps_on_device", [False, True])
def test_grad_scale_and_found_inf(steps_on_device):
    """torch's fused semantics: grads are unscaled in place by grad_scale; a step with
    found_inf nonzero leaves parameters, states, step counts and histograms untouched."""
    case = Case(SIZES["mixed"], amsgrad=True, steps_on_device=steps_on_device, seed=10)
    scale = torch.tensor(1024.0, device=DEVICE)
    count = 0
    for inf in [0.0, 0.0, 1.0, 0.0]:
        found_inf = torch.tensor(inf, device=DEVICE)
        gk, gr = case.grads(scale=1024.0)
        before = {k: [t.clone() for t in v] for k, v in case.k.items()}
        hist_before = (case.hk.step.clone(), case.hk.total.clone())
        on_triton(K.adam_hist)(
            *Case.args(case.k, gk),
            hist=case.hk,
            **hyper(amsgrad=True, grad_scale=scale, found_inf=found_inf, capturable=steps_on_device),
        )
        if inf:
            for k, v in case.k.items():
                for a, b in zip(v, before[k], strict=True):
                    assert torch.equal(a, b), f"{k} changed on a skipped step"
            assert torch.equal(case.hk.step, hist_before[0]) and torch.equal(case.hk.total, hist_before[1])
            assert all(torch.equal(a, b) for a, b in zip(gk, gr, strict=True))  # grads not unscaled either
            continue
        count += 1
        # reference: unscale by hand (IEEE division, as torch's fused kernels do), then plain Adam
        unscaled = [g / scale for g in gr]
        for a, b in zip(gk, unscaled, strict=True):
            assert torch.equal(a, b), "grads must be unscaled in place"
        reference(*Case.args(case.r, unscaled), hist=case.hr, **hyper(amsgrad=True))
        assert [float(s) for s in case.k["state_steps"]] == [float(count)] * case.n
        check(case, p_ulp=DEVICE_STEP_ULP if steps_on_device else None)
    assert count == 3


def test_fused_reference_with_grad_scale():
    """Against torch's fused CPU/CUDA Adam with grad_scale/found_inf (its own rounding: states
    and parameters within a few ulp; histograms against the oracle of the kernel's state).

    torch's fused CPU Adam (ATen FusedAdamKernel.cpp) runs a vectorised loop and a scalar
    tail (``numel % Vec::size()`` elements of a chunk: 8 floats with AVX2, 16 with AVX-512,
    so which elements are in the tail depends on the machine). Its sqrt is the IEEE one
    (``sqrtps``/``std::sqrt``, not MKL), and its float32 constants (``fl32(beta2)``,
    ``fl32(1 - beta2)``, ``fl32(1 - beta1)``, ``c``, ``step_size``) are the kernel's.
    - ``m``: the vectorised loop is the kernel's ``fma(w, g - m, base)``; the scalar tail
      writes ``m + w * (g - m)``, which GCC contracts to the same fma or rounds the product
      first: then one extra rounding, at most 1/2 ulp of the product ``w * (g - m)``, so
      within 2 ulp of the larger of ``m`` and its change.
    - ``v``: both compute ``a = fl(v * beta2)`` and ``b = fl(fl32(1 - beta2) * g)``; torch
      adds ``fl(b * g)`` to ``a`` where the kernel rounds ``b * g + a`` once (fma): one extra
      rounding of a nonnegative term of a nonnegative sum, within 2 ulp of ``v``.
    - ``p``: from ``v``'s relative difference of 2u (u = 2**-24) the two sides round the sqrt,
      ``/ c``, ``+ eps`` and ``m / denom`` independently, each adding at most 2u to the
      relative difference (u per side): 2u + 4 * 2u = 10u of the update, under 10 ulp of it,
      plus 1 ulp of the sum: 11 ulp. A tail element whose ``m`` nearly cancels carries
      ``m``'s 2 ulp instead, of a smaller update. Measured on an AMD EPYC: parameters equal,
      states within 1 ulp."""
    case = Case(SIZES["mixed"], steps_on_device=True, seed=11)
    scale = torch.tensor(64.0, device=DEVICE)
    for inf in (0.0, 1.0, 0.0):
        found = torch.tensor(inf, device=DEVICE)
        gk, gr = case.grads(scale=64.0)
        on_triton(K.adam_hist)(
            *Case.args(case.k, gk), hist=case.hk, **hyper(grad_scale=scale, found_inf=found, fused=True)
        )
        reference(*Case.args(case.r, gr), hist=case.hr, **hyper(grad_scale=scale, found_inf=found, fused=True))
        for a, b in zip(gk, gr, strict=True):
            assert_ulp(a, b, 0, "unscaled grad")
        check(case, p_ulp=11.0, state_exact=False, hist_vs_reference=False)


def test_capturable_device_path():
    """capturable=True: bias corrections computed with device ops (no host read of the step);
    the reference runs capturable=False (torch's capturable path rejects CPU tensors)."""
    case = Case(SIZES["mixed"], amsgrad=True, steps_on_device=True, seed=12)
    for step in range(3):
        lr = torch.tensor(1e-2 / (step + 1), device=DEVICE)
        gk, gr = case.grads()
        kw = dict(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True)
        on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper(lr=lr, capturable=True, **kw))
        reference(
            *Case.args(case.r, gr),
            hist=case.hr,
            **hyper(lr=lr if not ON_CPU else float(lr), capturable=not ON_CPU, **kw),
        )
        check(case, p_ulp=DEVICE_STEP_ULP)


def _dispatched(lists, hist, kw, refused: str):
    """The call as the dispatcher runs it with the kernels asked for: it must turn the
    kernel down for ``refused`` and run the call elsewhere."""
    with backend.use("triton"):
        choice = dispatch.choose(ADAM, DEVICE, lists, hist, kw)
    assert choice.backend != backend.TRITON and refused in choice.reason, choice
    backend.run(choice.backend, ADAM, lists, hist, kw)


def test_differentiable_routes_to_reference():
    case = Case([(4,), (2, 3)], seed=13)
    gk, gr = case.grads()
    _dispatched(Case.args(case.k, gk), case.hk, hyper(differentiable=True), "differentiable=True")
    adam_reference(*Case.args(case.r, gr), hist=case.hr, **hyper(differentiable=True))
    for a, b in zip(case.k["params"], case.r["params"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(case.hk.total, case.hr.total)


@pytest.mark.parametrize("forced", [False, True], ids=["auto", "tl"])
def test_backends_says_which_histogram_strategy_ran(forced):
    """``opt.backends()`` carries the histogram strategy of the Triton launch: the shared
    one (its interpreter twin, ``words``, on the CPU; on a GPU ``tl.histogram`` where the
    guard refused the shared one, with its warning) or ``tl.histogram`` when asked for."""
    p = torch.randn(300, device=DEVICE, requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = fasthist.Adam([p])
    if forced:
        K.configure(histogram="tl")
    try:
        with backend.use("triton"):
            opt.step()
    finally:
        K.configure()
    (choice,) = opt.backends().values()
    assert choice.backend == "triton"
    if forced:
        assert choice.strategy == "tl.histogram"
    else:
        assert choice.strategy == ("words" if ON_CPU else "shared")


def test_the_launcher_leaves_the_step_counts_to_the_backend():
    """The launcher takes ready inputs: called bare it reads the step counts as already
    incremented and leaves them; :func:`fasthist.backend.stepped` around it adds one, and
    takes it back on a step skipped by ``found_inf`` (torch's ``_fused_adam``)."""
    case = Case([(5,), (70,)], seed=31)
    steps = case.k["state_steps"]
    for s in steps:
        s.fill_(3.0)
    gk, _ = case.grads()
    K.adam_hist(*Case.args(case.k, gk), hist=case.hk, **hyper())
    assert [float(s) for s in steps] == [3.0, 3.0]
    skipped = torch.tensor(1.0, device=DEVICE)
    on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper(found_inf=skipped, fused=True))
    assert [float(s) for s in steps] == [3.0, 3.0]
    on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper(found_inf=skipped * 0, fused=True))
    assert [float(s) for s in steps] == [4.0, 4.0]


# -- launch structure ---------------------------------------------------------------------
class _Counting:
    def __init__(self, fn):
        self.fn, self.launches, self.grids = fn, 0, []

    def __getitem__(self, grid):
        self.launches += 1
        self.grids.append(grid)
        return self.fn[grid]


def test_constant_launches_and_cached_table(monkeypatch):
    main = _Counting(_common.fused_step_kernel)
    fin = _Counting(_histogram._finalize_kernel)
    monkeypatch.setattr(_common, "fused_step_kernel", main)
    monkeypatch.setattr(_histogram, "_finalize_kernel", fin)
    shapes = [(n,) for n in range(1, 41)] + [(C + 7,)]
    case = Case(shapes, seed=14)
    gk, _ = case.grads()
    on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper())
    assert (main.launches, fin.launches) == (1, 1)
    assert main.grids[0] == (len(shapes) - 1 + 2,)  # one program per chunk: 40 small + 2 for the big one
    t1 = _common.TensorTable.get(
        DEVICE,
        [case.k["params"], gk, case.k["exp_avgs"], case.k["exp_avg_sqs"], case.k["exp_avg_sqs"]],
        [p.numel() for p in case.k["params"]],
        list(range(len(shapes))),
        _common.SHAPE.chunk,
    )
    on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper())  # same tensors: table reused
    t2 = _common.TensorTable.get(
        DEVICE,
        [case.k["params"], gk, case.k["exp_avgs"], case.k["exp_avg_sqs"], case.k["exp_avg_sqs"]],
        [p.numel() for p in case.k["params"]],
        list(range(len(shapes))),
        _common.SHAPE.chunk,
    )
    assert t1 is t2
    assert (main.launches, fin.launches) == (2, 2)


def test_mixed_dtypes_one_launch_per_dtype(monkeypatch):
    main = _Counting(_common.fused_step_kernel)
    monkeypatch.setattr(_common, "fused_step_kernel", main)
    case = Case([(5,), (6,)], seed=15)
    for d in (case.k,):
        d["params"][1] = d["params"][1].to(torch.bfloat16)
        d["exp_avgs"][1] = torch.zeros_like(d["params"][1])
        d["exp_avg_sqs"][1] = torch.zeros_like(d["params"][1])
    gk, _ = case.grads()
    on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper())
    assert main.launches == 2
    assert int(case.hk.step.sum()) == 11


def test_without_histograms():
    """hist=None (track=False): the update alone, no histogram code compiled in."""
    case = Case(SIZES["mixed"], amsgrad=True, seed=18)
    for _ in range(2):
        gk, gr = case.grads()
        on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=None, **hyper(amsgrad=True))
        reference(*Case.args(case.r, gr), hist=None, **hyper(amsgrad=True))
        for i, (a, b, prev) in enumerate(zip(case.k["params"], case.r["params"], case.prev, strict=True)):
            if ON_CPU:  # exact, as check() argues
                assert same(a, b), f"param {i}"
            else:
                assert_ulp(a, b, 2.0, f"param {i}", prev)
        for a, b in zip(case.k["exp_avg_sqs"], case.r["exp_avg_sqs"], strict=True):
            assert same(a, b) if ON_CPU else True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_interpreter(dtype):
    """bf16/fp16 on the CPU: the interpreter truncates where the GPU rounds on store, and
    torch rounds after every op, so the tolerance is 3 ulp of the dtype (one step from the
    same state); histograms are exact against the oracle of the kernel's own state.
    eps=1e-4: torch's per-op float16 path turns eps=1e-8 into 0 and divides by an underflowed
    v (inf), where the kernel (float32 arithmetic, like torch's fused kernels) does not."""
    case = Case(SIZES["mixed"], dtype=dtype, amsgrad=True, seed=19)
    for _ in range(2):
        gk, gr = case.grads()
        on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **hyper(amsgrad=True, lr=1e-3, eps=1e-4))
        reference(*Case.args(case.r, gr), hist=case.hr, **hyper(amsgrad=True, lr=1e-3, eps=1e-4))
        check(case, p_ulp=3.0, state_exact=False, hist_vs_reference=False)


def test_errors():
    case = Case([(3,)], seed=16)
    gk, _ = case.grads()
    with pytest.raises(TypeError, match="grad 0"):
        on_triton(K.adam_hist)(*Case.args(case.k, [gk[0].double().float().to(torch.float16)]), hist=None, **hyper())


# -- through the optimizer ----------------------------------------------------------------
def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(DEVICE)


# fasthist.Adam/AdamW on the kernels against the reference: test_contract.py::test_backends_agree


def test_gradscaler_fused_protocol():
    """torch.amp.GradScaler hands grad_scale/found_inf to a fused=True optimizer: on the
    kernel backend an overflowing step is skipped on the device (parameters, states, step
    count, histograms untouched) and the other steps follow the reference backend."""
    models = [_model(2), _model(2)]
    opts = [fasthist.Adam(m.parameters(), lr=1e-2, fused=True) for m in models]
    scalers = [torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8) for _ in models]
    x = torch.randn(8, 7, device=DEVICE)
    for i in range(4):
        xi = x.clone()
        if i == 2:
            xi[0, 0] = float("inf")
        prev = [p.detach().clone() for p in models[1].parameters()]
        before = [p.detach().clone() for p in models[0].parameters()]
        totals = opts[0].histogram(window="total").counts.clone() if i else None
        for name, m, o, sc in zip(("triton", "reference"), models, opts, scalers, strict=True):
            with backend.use(name):
                o.zero_grad()
                sc.scale(m(xi).pow(2).mean()).backward()
                sc.step(o)
                sc.update()
        if i != 2:  # the skipped step never reaches the optimizer's step
            assert_ran(opts[0], backend.TRITON)
        if i == 2:
            for p, b in zip(models[0].parameters(), before, strict=True):
                assert torch.equal(p.detach(), b)
            assert torch.equal(opts[0].histogram(window="total").counts, totals)
            assert all(float(st["step"]) == 2.0 for st in opts[0].state.values())
        for a, b, pb in zip(models[0].parameters(), models[1].parameters(), prev, strict=True):
            assert_ulp(a.detach(), b.detach(), 4.0 * (i + 1), f"param after step {i}", pb)
        ha, hb = opts[0].histogram(window="total"), opts[1].histogram(window="total")
        assert ha.count == hb.count
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**8


# -- GPU only -----------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gpu(dtype):
    """bf16/fp16 params and states (as torch keeps them): within 2 ulp of the dtype of the
    reference over 3 steps; histograms exact against the oracle of the kernel's own state."""
    case = Case(SIZES["mixed"] + [(C + 1,)], dtype=dtype, amsgrad=True, seed=20)
    for _ in range(3):
        gk, gr = case.grads()
        kw = hyper(amsgrad=True, lr=1e-3, eps=1e-4)  # eps: see test_low_precision_interpreter
        on_triton(K.adam_hist)(*Case.args(case.k, gk), hist=case.hk, **kw)
        reference(*Case.args(case.r, gr), hist=case.hr, **kw)
        check(case, p_ulp=2.0, state_exact=False, hist_vs_reference=False)


@gpu
@pytest.mark.gpu
def test_cuda_graph_capture_replay():
    """capturable=True: opt.step() captured once in a CUDA graph and replayed; parameters and
    both histogram windows follow an eager run step for step."""
    models = [_model(1), _model(1)]
    opts = [fasthist.Adam(m.parameters(), lr=1e-2, capturable=True) for m in models]
    xs = [torch.randn(16, 7, device=DEVICE) for _ in range(8)]
    static_x = xs[0].clone()

    def train_step(m, o, x):
        o.zero_grad(set_to_none=False)
        m(x).pow(2).sum().backward()
        o.step()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):  # warm-up (also builds and caches the kernel tables)
            static_x.copy_(xs[i])
            train_step(models[0], opts[0], static_x)
    torch.cuda.current_stream().wait_stream(s)
    assert_ran(opts[0], "triton")  # the kernel is what the graph captures
    for i in range(3):
        train_step(models[1], opts[1], xs[i])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(models[0], opts[0], static_x)
    for i in range(3, 8):
        static_x.copy_(xs[i])
        graph.replay()
        train_step(models[1], opts[1], xs[i])
        torch.cuda.synchronize()
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for window in ("step", "total"):
            ha, hb = opts[0].histograms(window=window), opts[1].histograms(window=window)
            for k in ha:
                assert ha[k] == hb[k], f"{window} histogram of {k} after replay {i}"


def test_float64_runs_on_the_reference():
    case = Case([(5,), (2, 3)], dtype=torch.float64, seed=17)
    gk, gr = case.grads()
    _dispatched(Case.args(case.k, gk), case.hk, hyper(), "no adam kernel for torch.float64")
    adam_reference(*Case.args(case.r, gr), hist=case.hr, **hyper())
    for a, b in zip(case.k["params"], case.r["params"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(case.hk.step, case.hr.step)


@gpu
@pytest.mark.gpu
def test_device_bias_correction_matches_reference():
    """The kernel inlines bias_correction2_sqrt's device branch: same float32 values."""
    steps = [torch.tensor(float(s), device=DEVICE) for s in (1, 2, 3, 10, 1000)]
    coef = K._coefficients(steps, DEVICE, True, 1e-3, 0.9, 0.999, 0.0, False)
    assert torch.equal(coef[:, 1], bias_correction2_sqrt(steps, 0.999).to(torch.float32))


# -- compiled mode without a GPU ----------------------------------------------------------
_AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fasthist.bins import LogBins
from fasthist.kernels import _common as C, _histogram as H, adam as K

spec = C.BinSpec(LogBins()).kwargs()
ptr = dict(table_ptr="*i64", chunk_ptr="*i64", coef_ptr="*fp32", scratch_ptr="*i64", grad_scale_ptr="*fp32",
           found_inf_ptr="*fp32", rows_ptr="*i64", step_ptr="*i64", total_ptr="*i64")

def compile_(fn, consts, num_warps):
    sig = {a: "constexpr" if a in consts else ptr.get(a, "fp32") for a in fn.arg_names}
    src = ASTSource(fn, sig, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "enable_fp_fusion": False})

for dtype, track, ams, wd in [(tl.float32, True, True, 1), (tl.bfloat16, True, False, 2), (tl.float16, False, True, 0)]:
    consts = C.constexprs(K.BODY, K.AdamFlags(AMSGRAD=ams, MAXIMIZE=True, WD_MODE=wd, LERP_SMALL=True), dtype,
                          C.bin_layout(spec if track else C.NO_BINS, C.SHAPE.num_warps), grad_scale=True, found_inf=True,
                          hist=C.HIST_SHARED if track else C.HIST_OFF)
    ptx = compile_(C.fused_step_kernel, consts, C.SHAPE.num_warps).asm["ptx"]
    for bad in ("sqrt.approx", "div.full", "div.approx"):
        assert bad not in ptx, f"{dtype}: imprecise {bad} in the PTX"
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx and "fma.rn.f32" in ptx
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx, "full aligned chunks must use vector access"
    if track:
        assert "red.global" in ptx or "atom.global" in ptx, "no histogram flush"
compile_(H._finalize_kernel, dict(NUM_BINS=spec["NUM_BINS"], STRIDE=spec["NUM_BINS"], FB=1024, HAS_FOUND_INF=True), 4)
print("ok")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """Compiled mode (frontend, LLVM, PTX) for an H100/H200 target, no device needed: catches
    what the interpreter lets through, and checks the roundings are the precise ones."""
    compile_without_a_gpu(_AOT_SCRIPT, timeout=300, env={"TRITON_DEFAULT_FP_FUSION": "0"})
