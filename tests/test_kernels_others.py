"""The fused Triton RMSprop, Adagrad and AdaBelief kernels against the reference backend.

On a CPU-only machine the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set
here before ``fasthist.kernels`` is first imported); with CUDA they run compiled.

Each step starts the reference from the kernel's parameters and states, then compares:

- on the CPU, everything bit-identical: the moment states (v, g_avg, sum, m, s, s_max),
  parameters and momentum buffers, against the reference run with a correctly rounded sqrt
  (:class:`_kernel_helpers.IEEESqrt`). torch's CPU float32 sqrt is MKL VML's, 1 ulp off
  round-to-nearest on ~16% of inputs on some CPUs and not on others (MKL picks its code path
  per CPU), which put parameters up to 3 ulp from the kernel on an AMD EPYC. Every other
  operation on both sides is one IEEE-rounded float32 operation (or an fma both sides
  make) in the same order on the same float32 constants, so with the sqrt fixed the results
  are equal on any x86-64 build; measured: equal in every configuration below;
- on CUDA, parameters and momentum buffers (which go through the sqrt) within 2 ulp of the
  larger of the value and its update (torch's CUDA kernels round differently);
- histograms, both windows: exactly equal to the reference backend's (on CPU).
"""

from __future__ import annotations

import pytest
import torch
from _kernel_helpers import (  # before triton
    BINS,
    DEVICE,
    INTERPRETING,
    ON_CPU,
    assert_ulp,
    compile_without_a_gpu,
    ieee_sqrt,
    on_triton,
    same,
    target,
    ulp,
)
from torch import Tensor

pytest.importorskip("triton")

from fasthist.reference.adabelief import adabelief_reference, adabelief_scale_inv  # noqa: E402
from fasthist.reference.adagrad import adagrad_reference  # noqa: E402
from fasthist.reference.rmsprop import rmsprop_reference  # noqa: E402

# torch's own optimizers (and AdaBelief's reference) with a correctly rounded sqrt: see run()
rmsprop_reference = ieee_sqrt(rmsprop_reference)
adagrad_reference = ieee_sqrt(adagrad_reference)
adabelief_reference = ieee_sqrt(adabelief_reference)

KR = pytest.importorskip("fasthist.kernels.rmsprop")
KA = pytest.importorskip("fasthist.kernels.adagrad")
KB = pytest.importorskip("fasthist.kernels.adabelief")

if ON_CPU and not INTERPRETING:
    pytest.skip("fasthist.kernels needs TRITON_INTERPRET=1 on a machine without CUDA", allow_module_level=True)

pytestmark = pytest.mark.interpreter if ON_CPU else []
C = pytest.importorskip("fasthist.kernels._common").SHAPE.chunk

# why each shape: not a multiple of the block; two programs of one tensor (CHUNK + 4);
# a 0-d scalar; an empty tensor (no program at all); a transposed (dense, permuted) view
# walked in place; a strided slice (not dense) that goes through a copy and write-back.
SHAPES = [(37, 5), (C + 4,), (), (0,), "transposed", "strided"]


def make(shape, gen, dtype=torch.float32):
    if shape == "transposed":
        return torch.randn(9, 13, generator=gen).to(DEVICE, dtype).t()
    if shape == "strided":
        return torch.randn(10, 12, generator=gen).to(DEVICE, dtype)[:, ::3]
    return torch.randn(shape, generator=gen).to(DEVICE, dtype)


def like(p: Tensor, fill: float = 0.0) -> Tensor:
    """A state tensor with the parameter's layout (torch.zeros_like keeps strides of dense
    tensors; for the strided slice we keep a strided state too, to exercise the copy path)."""
    if not p.is_contiguous() and p.dim() == 2 and p.stride(1) == 3:
        return torch.full((p.shape[0], p.shape[1] * 3), fill, device=p.device, dtype=p.dtype)[:, ::3]
    return torch.full_like(p, fill, memory_format=torch.preserve_format)


def grads_for(params, gen, zero_first_row=True):
    out = []
    for p in params:
        shape = p.shape
        mag = 10.0 ** (torch.rand(shape, generator=gen) * 6 - 3)
        g = (torch.randn(shape, generator=gen) * mag).to(DEVICE, p.dtype)
        if zero_first_row and g.dim() == 2:
            g[0] = 0.0  # exact zeros in the states
        out.append(g)
    return out


def run(
    kernel,
    reference,
    state_names,
    exact,
    ulp_names,
    init,
    kwargs,
    steps=3,
    seed=0,
    shapes=SHAPES,
    extra=None,
    param_slack=None,
    oracle=None,
    param_ulp=2,
):
    """Run ``steps`` steps of kernel and reference from identical inputs; compare.
    ``param_slack(i, state, previous_state)`` (CUDA): extra absolute tolerance on parameter i,
    for updates that carry the ulps of a state compared within ulps; ``param_ulp`` (CUDA). ``oracle(state,
    steps)``: per tensor, the histogrammed value computed (correctly rounded, on the CPU)
    from the kernel's own state; the step window must be exactly its histogram."""
    gen = torch.Generator().manual_seed(seed)
    params = [make(s, gen) for s in shapes]
    k_state = {
        name: [like(p, init.get(name, 0.0)) if init.get(name) is not None else like(p) for p in params]
        for name in state_names
    }
    for name, fill in init.items():
        if fill is None:  # an unused list
            k_state[name] = []
    r_state = {name: [t.clone() for t in lst] for name, lst in k_state.items()}
    r_params = [p.clone() for p in params]
    k_steps = [torch.tensor(0.0) for _ in params]
    r_steps = [torch.tensor(0.0) for _ in params]
    hk, hr = target(len(params)), target(len(params))
    for step in range(steps):
        for a, b in zip(params, r_params, strict=True):
            b.copy_(a)
        for name in state_names:
            for a, b in zip(k_state[name], r_state[name], strict=True):
                b.copy_(a)
        previous = [p.clone() for p in r_params]
        previous_state = {name: [t.clone() for t in r_state[name]] for name in ulp_names}
        grads = grads_for(params, gen)
        more = extra(step) if extra is not None else {}
        on_triton(kernel)(
            params, [g.clone() for g in grads], *(k_state[n] for n in state_names), k_steps, hist=hk, **kwargs, **more
        )
        reference(
            r_params, [g.clone() for g in grads], *(r_state[n] for n in state_names), r_steps, hist=hr, **kwargs, **more
        )
        for a, b in zip(k_steps, r_steps, strict=True):
            assert float(a) == float(b)
        for name in state_names:
            for i, (a, b) in enumerate(zip(k_state[name], r_state[name], strict=True)):
                if name in exact and ON_CPU:
                    assert same(a, b), f"step {step}: {name}[{i}] differs"
                elif name in exact:  # torch's CUDA kernels round differently
                    assert_ulp(a, b, 2, f"step {step}: {name}[{i}]", b, previous_scales=True)
                elif name in ulp_names and ON_CPU:
                    assert same(a, b), f"step {step}: {name}[{i}] differs"
                elif name in ulp_names:
                    assert_ulp(a, b, 2, f"step {step}: {name}[{i}]", previous_state[name][i], previous_scales=True)
        for i, (a, b, prev) in enumerate(zip(params, r_params, previous, strict=True)):
            if ON_CPU:
                assert same(a, b), f"step {step}: param {i} differs"
                continue
            slack = param_slack(i, r_state, previous_state) if param_slack is not None else 0.0
            assert_ulp(a, b, param_ulp, f"step {step}: param {i}", prev, previous_scales=True, slack=slack)
        if ON_CPU:
            assert torch.equal(hk.step, hr.step), f"step {step}: step window"
            assert torch.equal(hk.total, hr.total), f"step {step}: total window"
        else:
            assert torch.equal(hk.total.sum(1), hr.total.sum(1))
        if oracle is not None:
            cpu_state = {name: [t.detach().cpu() for t in lst] for name, lst in k_state.items()}
            n = len(params)
            for i, value in enumerate(oracle(cpu_state, [float(t) for t in k_steps])):
                assert torch.equal(hk.step[n - 1 - i].cpu(), BINS.count(value)), f"step {step}: oracle, tensor {i}"
    return hk


def sqrt_rn(v: Tensor) -> Tensor:
    return v.double().sqrt().float()


def rmsprop_oracle(centered):
    def values(state, steps):
        out = []
        for i, v in enumerate(state["square_avgs"]):
            if centered:
                ga = state["grad_avgs"][i]
                v = v.addcmul(ga, ga, value=-1)  # CPU addcmul: one fma, as the kernel
            out.append(sqrt_rn(v))
        return out

    return values


def adagrad_oracle(state, steps):
    return [sqrt_rn(s) for s in state["state_sums"]]


def adabelief_oracle(kw):
    def values(state, steps):
        beta2 = kw["beta2"]
        use_max = kw["amsgrad"] and not kw["rectify"]
        out = []
        for i, t in enumerate(steps):
            v = state["max_exp_avg_vars"][i] if use_max else state["exp_avg_vars"][i]
            out.append(v.float() * torch.tensor(adabelief_scale_inv(int(t), beta2), dtype=torch.float32))
        return out

    return values


# -- RMSprop ------------------------------------------------------------------------------
RMS_CONFIGS = {
    "plain": {},
    "centered": {"centered": True},
    "momentum": {"momentum": 0.9},
    "all": {"centered": True, "momentum": 0.5, "alpha": 0.9, "weight_decay": 0.1, "maximize": True},
    "alpha-small": {"centered": True, "alpha": 0.3},  # lerp weight 0.7 >= 0.5: the other lerp formula
    "tensor-lr": {"lr": torch.tensor(3e-3), "momentum": 0.9},  # read on the device
}


@pytest.mark.parametrize("name", list(RMS_CONFIGS))
def test_rmsprop_kernel_matches_reference(name):
    kw = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False}
    kw.update(RMS_CONFIGS[name])
    kw.update(foreach=False, maximize=kw.get("maximize", False))
    init = {
        "grad_avgs": None if not kw["centered"] else 0.0,
        "momentum_buffer_list": None if kw["momentum"] == 0 else 0.0,
    }

    def slack(i, state, previous):
        # p = fma(buf, -lr, p): buf's 2-ulp tolerance (of its largest term) times lr
        if kw["momentum"] == 0:
            return 0.0
        b, b0 = state["momentum_buffer_list"][i].double(), previous["momentum_buffer_list"][i].double()
        big = torch.maximum(torch.maximum(b.abs(), b0.abs()), (b - b0).abs())
        return kw["lr"] * 2 * ulp(big.float())

    h = run(
        KR.rmsprop_hist,
        rmsprop_reference,
        ["square_avgs", "grad_avgs", "momentum_buffer_list"],
        {"square_avgs", "grad_avgs"},
        {"momentum_buffer_list"},
        init,
        kw,
        param_slack=slack,
        oracle=rmsprop_oracle(kw["centered"]),
    )
    assert int(h.total.sum()) == 3 * (185 + C + 4 + 1 + 0 + 117 + 40)


def test_rmsprop_kernel_complex():
    kw = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.9, "centered": True}
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(33, 3, dtype=torch.complex64, generator=gen).to(DEVICE)
    q = p.clone()
    st = {k: [torch.zeros_like(p)] for k in ("v", "ga", "buf")}
    sr = {k: [torch.zeros_like(p)] for k in ("v", "ga", "buf")}
    hk, hr = target(1), target(1)
    for _ in range(2):
        g = torch.randn(33, 3, dtype=torch.complex64, generator=gen).to(DEVICE)
        q.copy_(p)
        for k in st:
            sr[k][0].copy_(st[k][0])
        on_triton(KR.rmsprop_hist)([p], [g.clone()], st["v"], st["ga"], st["buf"], [torch.tensor(0.0)], hist=hk, **kw)
        rmsprop_reference([q], [g.clone()], sr["v"], sr["ga"], sr["buf"], [torch.tensor(0.0)], hist=hr, **kw)
        assert same(st["v"][0], sr["v"][0]) and same(st["ga"][0], sr["ga"][0])
        assert torch.equal(hk.step, hr.step)
    assert int(hk.step.sum()) == 2 * p.numel()


# -- Adagrad ------------------------------------------------------------------------------
ADAGRAD_CONFIGS = {
    "plain": {},
    "decay": {"lr_decay": 0.1, "weight_decay": 0.1, "maximize": True},
    "init-accumulator": {"init": 0.1},
}


@pytest.mark.parametrize("name", list(ADAGRAD_CONFIGS))
def test_adagrad_kernel_matches_reference(name):
    cfg = dict(ADAGRAD_CONFIGS[name])
    init = cfg.pop("init", 0.0)
    kw = {"lr": 1e-2, "weight_decay": 0.0, "lr_decay": 0.0, "eps": 1e-10, "maximize": False}
    kw.update(cfg)
    run(
        KA.adagrad_hist,
        adagrad_reference,
        ["state_sums"],
        {"state_sums"},
        set(),
        {"state_sums": init},
        kw,
        oracle=adagrad_oracle,
    )


def test_adagrad_kernel_fused_protocol_skips_on_found_inf():
    """fused: grads unscaled by grad_scale (and written back), a step with found_inf set
    changes nothing, not even the step counts."""
    kw = {"lr": 1e-2, "weight_decay": 0.0, "lr_decay": 0.01, "eps": 1e-10, "maximize": False, "fused": True}

    def extra(step):
        return {"grad_scale": torch.tensor(4.0), "found_inf": torch.tensor(1.0 if step == 1 else 0.0)}

    # contiguous tensors only: torch's fused CPU Adagrad (the reference here) walks a grad
    # whose strides differ from its parameter's in the wrong order (torch 2.13)
    shapes = [(37, 5), (C + 4,), (), (0,)]
    h = run(
        KA.adagrad_hist,
        adagrad_reference,
        ["state_sums"],
        {"state_sums"},
        set(),
        {"state_sums": 0.0},
        kw,
        extra=extra,
        shapes=shapes,
        oracle=adagrad_oracle,
    )
    assert int(h.total.sum()) == 2 * (185 + C + 4 + 1)


# -- AdaBelief ----------------------------------------------------------------------------
AB_BASE = {
    "lr": 1e-2,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-16,
    "weight_decay": 0.0,
    "amsgrad": False,
    "weight_decouple": True,
    "fixed_decay": False,
    "rectify": True,
    "degenerated_to_sgd": True,
}
AB_CONFIGS = {
    "defaults": {},
    "decoupled-wd": {"weight_decay": 0.1},
    "coupled-wd-amsgrad": {"weight_decay": 0.1, "weight_decouple": False, "amsgrad": True},
    "unrectified-amsgrad-fixed": {"rectify": False, "amsgrad": True, "weight_decay": 0.1, "fixed_decay": True},
    "short-warmup": {"beta2": 0.5, "degenerated_to_sgd": False},  # no update, then rectified from step 6
    "estimate-pass": {"lr": 0.0, "eps": 0.0},  # what estimate_eps_range runs: 0/0 must not reach p
}


@pytest.mark.parametrize("name", list(AB_CONFIGS))
def test_adabelief_kernel_matches_reference(name):
    kw = dict(AB_BASE, **AB_CONFIGS[name])
    init = {"exp_avgs": 0.0, "exp_avg_vars": 0.0, "max_exp_avg_vars": 0.0 if kw["amsgrad"] else None}
    steps = 7 if name == "short-warmup" else 3
    run(
        KB.adabelief_hist,
        adabelief_reference,
        ["exp_avgs", "exp_avg_vars", "max_exp_avg_vars"],
        {"exp_avgs", "exp_avg_vars", "max_exp_avg_vars"},
        set(),
        init,
        kw,
        steps=steps,
        oracle=adabelief_oracle(kw),
        # CUDA only (the CPU compares exactly): three roundings after torch's sqrt,
        # / sqrt(1 - beta2**t), + eps, then m / denom, each free to differ by 1 ulp
        param_ulp=3,
    )


# -- through the optimizer classes: test_contract.py::test_backends_agree -------------------
def test_kernels_are_dispatched():
    from fasthist import backend
    from fasthist.adabelief import ADABELIEF
    from fasthist.adagrad import ADAGRAD
    from fasthist.rmsprop import RMSPROP

    assert backend.kernel_function(RMSPROP) is KR.rmsprop_hist
    assert backend.kernel_function(ADAGRAD) is KA.adagrad_hist
    assert backend.kernel_function(ADABELIEF) is KB.adabelief_hist


# -- compiled mode without a GPU ----------------------------------------------------------
_AOT_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from fasthist.bins import LogBins
from fasthist.kernels import _common as C, rmsprop as R, adagrad as A, adabelief as B

spec = C.BinSpec(LogBins()).kwargs()
ptr = dict(table_ptr="*i64", chunk_ptr="*i64", coef_ptr="*fp32", clr_ptr="*fp32", scratch_ptr="*i64", lr_ptr="*fp32",
           grad_scale_ptr="*fp32", found_inf_ptr="*fp32")

def compile_(fn, consts):
    sig = {a: "constexpr" if a in consts else ptr.get(a, "fp32") for a in fn.arg_names}
    src = ASTSource(fn, sig, consts)
    opts = {"num_warps": C.SHAPE.num_warps, "enable_fp_fusion": False}
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    for bad in ("sqrt.approx", "div.full", "div.approx"):
        assert bad not in ptx, f"{consts['FLAGS']} {consts['DTYPE']}: imprecise {bad} in the PTX"
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx, consts["FLAGS"]
    if consts["HIST"]:
        assert "red.global" in ptx or "atom.global" in ptx, "no histogram flush"

for dtype, track in [(tl.float32, True), (tl.bfloat16, True), (tl.float16, False)]:
    bins = C.bin_layout(spec if track else C.NO_BINS, C.SHAPE.num_warps)
    hist = C.HIST_SHARED if track else C.HIST_OFF
    for centered, momentum, small in [(True, True, True), (False, False, False), (True, False, False)]:
        flags = R.RMSpropFlags(CENTERED=centered, MOMENTUM=momentum, MAXIMIZE=True, HAS_WD=True, LERP_SMALL=small,
                               LR_FROM_PTR=momentum)
        compile_(C.fused_step_kernel, C.constexprs(R.BODY, flags, dtype, bins, hist=hist))
    for scaled in (True, False):
        flags = A.AdagradFlags(MAXIMIZE=True, HAS_WD=True)
        compile_(C.fused_step_kernel, C.constexprs(A.BODY, flags, dtype, bins, hist=hist, grad_scale=scaled,
                                                   found_inf=scaled))
    if dtype is not tl.float16:
        for ams, rect, wd in [(True, True, 1), (True, False, 2), (False, True, 0)]:
            flags = B.AdaBeliefFlags(AMSGRAD=ams, RECTIFY=rect, WD_MODE=wd)
            compile_(C.fused_step_kernel, C.constexprs(B.BODY, flags, dtype, bins, hist=hist))
print("ok")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """Compiled mode (frontend, LLVM, PTX) for an H100/H200 target, no device needed: catches
    what the interpreter lets through, and checks the roundings are the precise ones."""
    compile_without_a_gpu(_AOT_SCRIPT, timeout=600)
