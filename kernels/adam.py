r"""Fused Adam/AdamW step that also histograms :math:`\sqrt{\hat v}` of every element.

Per element, in float32, with ``p, g, m, v[, v_max]`` loaded once and written once::

    g      = grad / grad_scale                      # only with grad_scale; written back
    g      = -g                                     # maximize
    g      = fma(p, weight_decay, g)                # coupled weight decay (Adam)
    p      = p * (1 - lr * weight_decay)            # decoupled weight decay (AdamW)
    m      = lerp(m, g, 1 - beta1)                  # fma(w, g - m, m), or fma(w - 1, g - m, g) for w >= 0.5
    v      = fma((1 - beta2) * g, g, v * beta2)     # exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
    v_max  = maximum(v_max, v)                      # amsgrad; the denominator uses v_max
    x      = sqrt_rn(v_den) / c                     # c = sqrt(1 - beta2**step), IEEE division
    p      = p + (-step_size * m) / (x + eps)       # step_size = lr / (1 - beta1**step)
    hist  += LogBins index of x                     # per program (kernels._common)

``m`` and ``v`` round as torch's single-tensor CPU path does (its CPU ``add(alpha=)``,
``lerp`` and ``addcmul`` kernels use FMA; checked against torch 2.13), so on the CPU they
and the histograms match the reference backend bit for bit. The parameter update does not
round identically: torch's CPU float32 sqrt is not correctly rounded (``sqrt_rn`` here is)
and its vectorised ``addcdiv`` multiplies ``m/d`` by the step where this divides
``-step*m`` by ``d``; ``p`` agrees within 2 ulp of the update's size (more than 2 ulp of
``p`` itself where the update nearly cancels ``p``). On the GPU,
``enable_fp_fusion=False`` keeps the compiler from adding contractions of its own.
``c`` and ``step_size`` are computed where torch computes them: on the host in float64 when
the step counts live on the CPU (then rounded to float32), on the device in float32 when
they live there (``fused=True``/``capturable=True``), ``c`` as
:func:`fasthist.reference.adam.bias_correction2_sqrt` computes it (its device branch is
inlined). States are kept in the parameter's dtype (float32, bfloat16 or float16) and
rounded on store; the denominator and the histogram use the stored value, as the reference
does. Complex parameters run as real pairs; a parameter whose layout a flat walk cannot
follow (a strided slice) runs on contiguous copies that are written back.

Launches per call: one main launch per parameter dtype (a table of tensor pointers and chunk
descriptors, cached while the tensors are unchanged; one program per chunk of ``SHAPE.chunk``
elements of one tensor, its histogram flushed once per program with atomics on non-zero
bins only), one finalize launch for the histogram windows (:mod:`fasthist.kernels._common`), and
the few ``torch`` ops that increment the step counts (and compute the bias corrections on the
device when capturable). ``grad_scale``/``found_inf`` follow torch's fused Adam: grads are
unscaled in place, and ``found_inf`` nonzero masks every load and store on the device, so
parameters, states, step counts and histograms stay untouched without a host sync (with step
counts on the CPU and ``found_inf`` on the GPU the flag is read on the host instead).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.reference.adam import bias_correction2_sqrt
from fasthist.target import HistTarget

from ._common import (
    PLANS,
    SHAPE,
    check_call,
    chunk_header,
    column,
    configure,
    hist_add,
    hist_begin,
    hist_end,
    launch,
    lerp_coefficients,
    load,
    plan_groups,
    rne,
    scalar,
    store,
    write_back,
)

__all__ = ["adam_hist", "configure"]

_PLANS = PLANS  # the shared plan cache (kept under this name for the tests)


def __getattr__(name: str) -> Any:
    """``BLOCK``, ``ITERS``, ``CHUNK``, ``NUM_WARPS``: the current shared launch shape."""
    shape = {"BLOCK": "block", "ITERS": "iters", "CHUNK": "chunk", "NUM_WARPS": "num_warps"}
    if name in shape:
        return getattr(SHAPE, shape[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@triton.jit
def _adam_chunk(
    acc,
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    numel,
    neg_step_size,
    c,
    decay,
    grad_scale,
    one_minus_beta1,
    lerp_coeff,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    MASKED: tl.constexpr,  # False: the chunk is full, no masks (vector loads and stores)
    ALIGNED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WD_MODE: tl.constexpr,
    LERP_SMALL: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HIST: tl.constexpr,
    SHIFT: tl.constexpr,
    LOW_KEY: tl.constexpr,
    ABOVE: tl.constexpr,
    NONFINITE: tl.constexpr,
    HIST_BINS: tl.constexpr,
    WINDOW: tl.constexpr,
    DUMP: tl.constexpr,
    SMEM_BINS: tl.constexpr,
    WORD_ASM: tl.constexpr,
):
    """The update of one chunk (``ITERS`` blocks of one tensor), counted into ``acc``."""
    trips = ITERS
    if MASKED:  # the tail chunk: only its live blocks
        trips = tl.cdiv(numel, BLOCK)
    for it in range(trips):
        offs = it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = load(g_ptr, offs, mask, MASKED, ALIGNED)
        if HAS_GRAD_SCALE:
            g = tl.div_rn(g, grad_scale)
            store(g_ptr, offs, rne(g, DTYPE), mask, MASKED, ALIGNED)
        if MAXIMIZE:
            g = -g
        p = load(p_ptr, offs, mask, MASKED, ALIGNED)
        if WD_MODE == 1:
            g = tl.fma(p, weight_decay, g)
        if WD_MODE == 2:
            p = p * decay
        m = load(m_ptr, offs, mask, MASKED, ALIGNED)
        if LERP_SMALL:
            m = tl.fma(one_minus_beta1, g - m, m)
        else:
            m = tl.fma(lerp_coeff, g - m, g)
        m = rne(m, DTYPE)
        store(m_ptr, offs, m, mask, MASKED, ALIGNED)
        v = load(v_ptr, offs, mask, MASKED, ALIGNED)
        v = rne(tl.fma(one_minus_beta2 * g, g, v * beta2), DTYPE)
        store(v_ptr, offs, v, mask, MASKED, ALIGNED)
        v_den = v.to(tl.float32)
        if AMSGRAD:
            v_den = tl.maximum(load(vmax_ptr, offs, mask, MASKED, ALIGNED), v_den, propagate_nan=tl.PropagateNan.ALL)
            store(vmax_ptr, offs, rne(v_den, DTYPE), mask, MASKED, ALIGNED)
        x = tl.div_rn(tl.sqrt_rn(v_den), c)
        p = p + tl.div_rn(neg_step_size * m.to(tl.float32), x + eps)
        store(p_ptr, offs, rne(p, DTYPE), mask, MASKED, ALIGNED)
        if HIST != 0:
            acc = hist_add(
                acc,
                x,
                mask,
                MASKED,
                HIST,
                SHIFT,
                LOW_KEY,
                ABOVE,
                NONFINITE,
                HIST_BINS,
                WINDOW,
                DUMP,
                SMEM_BINS,
                WORD_ASM,
            )
    return acc


@triton.jit
def _adam_hist_kernel(
    table_ptr,  # int64 [n, 7]: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, numel, slot
    chunk_ptr,  # int64 [num_chunks, 2]: table row, first element
    scratch_ptr,  # int64 [num_slots, NUM_BINS]
    coef_ptr,  # float32 [num_slots, 3]: -step_size, c = sqrt(1 - beta2**step), 1 - lr*wd
    grad_scale_ptr,
    found_inf_ptr,
    one_minus_beta1,  # float32(1 - beta1): the lerp weight
    lerp_coeff,  # weight, or weight - 1 when interpolating from the end (w >= 0.5)
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor of the launch starts 16-byte aligned
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WD_MODE: tl.constexpr,  # 0 none, 1 coupled (Adam), 2 decoupled (AdamW)
    LERP_SMALL: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HIST: tl.constexpr,  # kernels._common: HIST_OFF, HIST_TL, HIST_SHARED (HIST_PROBE)
    SHIFT: tl.constexpr,
    LOW_KEY: tl.constexpr,
    ABOVE: tl.constexpr,
    NONFINITE: tl.constexpr,
    NUM_BINS: tl.constexpr,
    HIST_BINS: tl.constexpr,
    WINDOW: tl.constexpr,
    DUMP: tl.constexpr,
    SMEM_BINS: tl.constexpr,
    SLAB: tl.constexpr,
    WORD_ASM: tl.constexpr,
):
    row, start, numel, slot = chunk_header(table_ptr, chunk_ptr, 7, BLOCK * ITERS)
    row_ptr = scratch_ptr + slot * NUM_BINS  # this program's histogram, zeroed first: fewer live registers
    acc = hist_begin(start < 0, row_ptr, HIST, HIST_BINS, DUMP, SMEM_BINS, SLAB)
    p_ptr = column(row, 0, start, DTYPE)
    g_ptr = column(row, 1, start, DTYPE)
    m_ptr = column(row, 2, start, DTYPE)
    v_ptr = column(row, 3, start, DTYPE)
    vmax_ptr = column(row, 4, start, DTYPE)  # a copy of v's without amsgrad
    neg_step_size = tl.load(coef_ptr + 3 * slot)
    c = tl.load(coef_ptr + 3 * slot + 1)
    decay = tl.load(coef_ptr + 3 * slot + 2)
    if HAS_FOUND_INF:  # a skipped step touches nothing: every element is masked off
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    args = (p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, numel, neg_step_size, c, decay, grad_scale)
    if numel == BLOCK * ITERS:  # a full chunk (most of them): no masks
        acc = _adam_chunk(
            acc, *args, one_minus_beta1, lerp_coeff, beta2, one_minus_beta2, eps, weight_decay,
            DTYPE, BLOCK, ITERS, False, ALIGNED, AMSGRAD, MAXIMIZE, WD_MODE, LERP_SMALL, HAS_GRAD_SCALE,
            HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS, WINDOW, DUMP, SMEM_BINS, WORD_ASM,
        )  # fmt: skip
    else:
        acc = _adam_chunk(
            acc, *args, one_minus_beta1, lerp_coeff, beta2, one_minus_beta2, eps, weight_decay,
            DTYPE, BLOCK, ITERS, True, ALIGNED, AMSGRAD, MAXIMIZE, WD_MODE, LERP_SMALL, HAS_GRAD_SCALE,
            HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS, WINDOW, DUMP, SMEM_BINS, WORD_ASM,
        )  # fmt: skip
    if HIST != 0:
        hist_end(
            acc, row_ptr, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, NUM_BINS, HIST_BINS, WINDOW, DUMP, SMEM_BINS, SLAB
        )


def _coefficients(
    state_steps: list[Tensor],
    device: torch.device,
    on_device: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    decoupled: bool,
) -> Tensor:
    """float32 ``[n, 3]`` on ``device``: ``-step_size``, ``c``, ``1 - lr*wd`` per tensor,
    computed after the step counts were incremented, where torch computes them."""
    n = len(state_steps)
    steps = torch.stack(state_steps).reshape(n)  # called under no_grad
    host_c = None
    if steps.device.type == "cpu":  # float64 on the host, one evaluation per distinct step count
        lr_f = scalar(lr, "lr", "Adam") if not on_device else 0.0
        uniq, inverse = np.unique(steps.numpy(), return_inverse=True)
        decay = 1 - lr_f * weight_decay if decoupled else 1.0
        per_step = np.empty((len(uniq), 3), dtype=np.float64)
        for j, st in enumerate(uniq.tolist()):
            (c,) = bias_correction2_sqrt([torch.tensor(st)], beta2)
            per_step[j] = (-(lr_f / (1 - beta1**st)), c, decay)
        host = torch.from_numpy(per_step[inverse.reshape(-1)].astype(np.float32))
        if not on_device:
            return host.to(device, non_blocking=True)
        host_c = host[:, 1].to(device)  # capturable with CPU step counts (CPU tensors): c as the reference has it
    # On the device in float32, no host read (capturable). c is bias_correction2_sqrt's
    # device branch, inlined so the steps are stacked once (equality with it is tested).
    steps = steps.to(device=device, dtype=torch.float32)
    c = (1 - torch.pow(beta2, steps)).sqrt() if host_c is None else host_c
    lr_t = lr.to(device=device, dtype=torch.float32) if isinstance(lr, Tensor) else lr
    neg_step = -(lr_t / (1 - torch.pow(beta1, steps)))
    decay = (1 - lr_t * weight_decay) if decoupled else 1.0
    if isinstance(decay, Tensor):
        decay_t = decay.to(torch.float32).reshape(-1).expand(n)
    else:  # a fill, not a host-to-device copy: legal while a CUDA graph is being captured
        decay_t = torch.full((n,), decay, dtype=torch.float32, device=device)
    return torch.stack([neg_step.to(torch.float32), c, decay_t], dim=1).contiguous()


def adam_hist(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: HistTarget | None,
    amsgrad: bool,
    has_complex: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    foreach: bool | None,
    capturable: bool,
    differentiable: bool,
    fused: bool | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    decoupled_weight_decay: bool,
) -> None:
    """``torch.optim.adam.adam`` (same arguments) in one fused launch per dtype, plus the
    histograms of sqrt(v_hat) into ``hist`` (see the module docstring).

    Takes what :mod:`fasthist.dispatch` gives it (float32/bfloat16/float16/complex64
    parameters, host betas, no autograd); ``foreach``, ``fused`` and ``differentiable`` are
    accepted and ignored (the kernel is always multi-tensor and fused).
    """
    if not params:
        return
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    with torch.no_grad():
        _adam_hist(
            *lists,
            hist=hist,
            amsgrad=amsgrad,
            beta1=scalar(beta1, "beta1", "Adam"),
            beta2=scalar(beta2, "beta2", "Adam"),
            lr=lr,
            weight_decay=float(weight_decay),
            eps=float(eps),
            maximize=maximize,
            capturable=capturable,
            grad_scale=grad_scale,
            found_inf=found_inf,
            decoupled=decoupled_weight_decay,
        )


def _adam_hist(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: HistTarget | None,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    capturable: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    decoupled: bool,
) -> None:
    device = params[0].device
    n = len(params)
    lengths = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "state_steps": state_steps}
    if amsgrad:
        lengths["max_exp_avg_sqs"] = max_exp_avg_sqs
    check_call("Adam", n, lengths, device, hist)
    vmax = max_exp_avg_sqs if amsgrad else [None] * n
    plan = plan_groups("Adam", device, [params, grads, exp_avgs, exp_avg_sqs, vmax])

    # Step counts: on the host (torch's default) or on the device (capturable/fused).
    on_device = capturable or state_steps[0].device.type != "cpu"
    if found_inf is not None:
        if not on_device and found_inf.device.type != "cpu":
            # Host step counts cannot be rolled back on the device: read the flag (a sync,
            # only for this unusual combination; torch's GradScaler syncs here too).
            if float(found_inf.item()) != 0.0:
                return
            found_inf = None
        else:
            found_inf = found_inf.to(device=device, non_blocking=True).reshape(())
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=device, non_blocking=True).reshape(())
    torch._foreach_add_(state_steps, 1)
    coef = _coefficients(state_steps, device, on_device, lr, beta1, beta2, weight_decay, decoupled)
    w, lerp_coeff, lerp_small = lerp_coefficients(1 - beta1)
    scalars = (w, lerp_coeff, beta2, 1 - beta2, eps, weight_decay)
    launch(
        _adam_hist_kernel,
        plan,
        hist,
        lambda tables, scratch: (
            tables.table,
            tables.chunks,
            scratch,
            coef,
            grad_scale if grad_scale is not None else coef,
            found_inf if found_inf is not None else coef,
            *scalars,
        ),
        {
            "AMSGRAD": bool(amsgrad),
            "MAXIMIZE": bool(maximize),
            "WD_MODE": 0 if weight_decay == 0 else (2 if decoupled else 1),
            "LERP_SMALL": lerp_small,
            "HAS_GRAD_SCALE": grad_scale is not None,
            "HAS_FOUND_INF": found_inf is not None,
        },
        device,
        found_inf,
    )
    write_back(plan, grads_written=grad_scale is not None)
    if found_inf is not None:
        flag = found_inf.to(state_steps[0].device)
        torch._foreach_sub_(state_steps, [flag] * n)
