r"""Fused AdaBelief step (as ``adabelief_pytorch.AdaBelief`` computes it) that also
histograms :math:`(1-\beta_2)\hat s` of every element.

Per element, in float32 with every torch op's result rounded to the state dtype (a no-op for
float32), ``p, g, m, s[, s_max]`` loaded once and written once::

    p      = p * decay                               # weight_decouple: 1 - lr*wd (or 1 - wd, fixed_decay)
    g      = fma(p, weight_decay, g)                 # coupled: grad.add(p, alpha=weight_decay)
    m      = fma(g, 1 - beta1, m * beta1)            # exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
    r      = g - m
    s      = fma((1 - beta2) * r, r, s * beta2)      # exp_avg_var.mul_(beta2).addcmul_(r, r, 1 - beta2)
    s      = s + eps                                 # eps enters the state every step
    s_max  = maximum(s_max, s)                       # amsgrad
    x      = v * c_inv                               # v = s_max (amsgrad, not rectify) or s;
                                                     # c_inv = float32(1) / float32((1 - beta2**t) / (1 - beta2)):
                                                     # histogrammed ((1-beta2)*s_hat within 1.5 ulp)
    mode 3 (rectify=False):  p = p + (scale * m) / (sqrt_rn(v) / sqrt(1 - beta2**t) + eps)
    mode 2 (rectified):      p = p + (scale * m) / (sqrt_rn(s) + eps)
    mode 1 (SGD warm-up):    p = fma(m, scale, p)
    mode 0 (no update, or lr == 0)

``scale``, ``c_inv``, ``decay`` and the mode are per tensor, computed on the host in float64 from
the step count as the reference does (AdaBelief's step counts live on the CPU). The FMAs are
the ones torch's CPU kernels make, so ``m``, ``s``, ``s_max`` and the histograms match the
reference backend bit for bit, and ``p`` within three ulp of the update (torch's CPU sqrt is
not correctly rounded, and three roundings follow it in the unrectified denominator).
float16 parameters (stepped in float32 with float32 states, as the package does) and
float64 parameters run on the reference backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.reference.adabelief import adabelief_scale_inv, adabelief_step_size
from fasthist.target import HistTarget

from ._common import (
    check_call,
    chunk_header,
    column,
    hist_add,
    hist_begin,
    hist_end,
    launch,
    load,
    plan_groups,
    rne,
    store,
    write_back,
)

__all__ = ["adabelief_hist"]


@triton.jit
def _adabelief_chunk(
    acc,
    p_ptr,
    g_ptr,
    m_ptr,
    s_ptr,
    smax_ptr,
    numel,
    decay,
    scale,
    sqrt_bc2,
    c_inv,
    mode,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGNED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    RECTIFY: tl.constexpr,
    WD_MODE: tl.constexpr,
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
    trips = ITERS
    if MASKED:  # the tail chunk: only its live blocks
        trips = tl.cdiv(numel, BLOCK)
    for it in range(trips):
        offs = it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = load(g_ptr, offs, mask, MASKED, ALIGNED)
        p = load(p_ptr, offs, mask, MASKED, ALIGNED)
        if WD_MODE == 2:
            p = rne(p * decay, DTYPE).to(tl.float32)
        if WD_MODE == 1:
            g = rne(tl.fma(p, weight_decay, g), DTYPE).to(tl.float32)
        m = load(m_ptr, offs, mask, MASKED, ALIGNED)
        m = rne(m * beta1, DTYPE).to(tl.float32)
        m = rne(tl.fma(g, one_minus_beta1, m), DTYPE)
        store(m_ptr, offs, m, mask, MASKED, ALIGNED)
        mf = m.to(tl.float32)
        r = rne(g - mf, DTYPE).to(tl.float32)
        s = load(s_ptr, offs, mask, MASKED, ALIGNED)
        s = rne(s * beta2, DTYPE).to(tl.float32)
        s = rne(tl.fma(one_minus_beta2 * r, r, s), DTYPE).to(tl.float32)
        s = rne(s + eps, DTYPE)
        store(s_ptr, offs, s, mask, MASKED, ALIGNED)
        sf = s.to(tl.float32)
        v = sf
        if AMSGRAD:
            smax = load(smax_ptr, offs, mask, MASKED, ALIGNED)
            smax = tl.maximum(smax, sf, propagate_nan=tl.PropagateNan.ALL)
            store(smax_ptr, offs, rne(smax, DTYPE), mask, MASKED, ALIGNED)
            if not RECTIFY:
                v = smax
        # v == 0 is zero; a nonzero v whose quotient underflows is below range (as the reference)
        x = v * c_inv
        # (x >= 0 or NaN; min(v, 2**-149) is 0 for v == 0, else 2**-149, below every range)
        tiny = tl.full(v.shape, 1, tl.int32).to(tl.float32, bitcast=True)
        x = tl.maximum(x, tl.minimum(v, tiny), propagate_nan=tl.PropagateNan.ALL)
        # the update: one of four modes per tensor (scalar), all lanes alike
        unrect = rne(
            (rne(tl.div_rn(rne(tl.sqrt_rn(v), DTYPE).to(tl.float32), sqrt_bc2), DTYPE).to(tl.float32) + eps), DTYPE
        )
        rect = rne((rne(tl.sqrt_rn(sf), DTYPE).to(tl.float32) + eps), DTYPE)
        denom = tl.where(mode == 3.0, unrect.to(tl.float32), rect.to(tl.float32))
        denom = tl.where(mode >= 2.0, denom, 1.0)  # unused: keep 0/0 (eps=0, s=0) out of the lanes
        adaptive = p + tl.div_rn(scale * mf, denom)
        sgd = tl.fma(mf, scale, p)
        p = tl.where(mode >= 2.0, adaptive, tl.where(mode == 1.0, sgd, p))
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
def _adabelief_hist_kernel(
    table_ptr,  # int64 [n, 7]: param, grad, exp_avg, exp_avg_var, max_exp_avg_var, numel, slot
    chunk_ptr,  # int64 [num_chunks, 2]: table row, first element
    scratch_ptr,  # int64 [num_slots, NUM_BINS]
    coef_ptr,  # float32 [num_slots, 5]: decay, scale, sqrt(1 - beta2**t), float32(1/c), mode
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    RECTIFY: tl.constexpr,
    WD_MODE: tl.constexpr,  # 0 none, 1 coupled, 2 decoupled
    HIST: tl.constexpr,
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
    s_ptr = column(row, 3, start, DTYPE)
    smax_ptr = column(row, 4, start, DTYPE)  # the parameter's own pointer without amsgrad
    coef = coef_ptr + 5 * slot
    decay = tl.load(coef)
    scale = tl.load(coef + 1)
    sqrt_bc2 = tl.load(coef + 2)
    c_inv = tl.load(coef + 3)
    mode = tl.load(coef + 4)
    args = (p_ptr, g_ptr, m_ptr, s_ptr, smax_ptr, numel, decay, scale, sqrt_bc2, c_inv, mode, beta1, one_minus_beta1)
    if numel == BLOCK * ITERS:  # a full chunk: no masks
        acc = _adabelief_chunk(
            acc, *args, beta2, one_minus_beta2, eps, weight_decay, DTYPE, BLOCK, ITERS, False, ALIGNED, AMSGRAD,
            RECTIFY, WD_MODE, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS, WINDOW, DUMP, SMEM_BINS, WORD_ASM,
        )  # fmt: skip
    else:
        acc = _adabelief_chunk(
            acc, *args, beta2, one_minus_beta2, eps, weight_decay, DTYPE, BLOCK, ITERS, True, ALIGNED, AMSGRAD,
            RECTIFY, WD_MODE, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS, WINDOW, DUMP, SMEM_BINS, WORD_ASM,
        )  # fmt: skip
    if HIST != 0:
        hist_end(
            acc, row_ptr, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, NUM_BINS, HIST_BINS, WINDOW, DUMP, SMEM_BINS, SLAB
        )


def _coefficients(
    steps: list[int],
    device: torch.device,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    weight_decouple: bool,
    fixed_decay: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
) -> Tensor:
    rows = []
    decay = 1.0 - (weight_decay if fixed_decay else lr * weight_decay)
    for t in steps:
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        if lr == 0:
            mode, scale = 0.0, 0.0
        elif not rectify:
            mode, scale = 3.0, -lr / bias_correction1
        else:
            n_sma, step_size = adabelief_step_size(t, beta1, beta2, degenerated_to_sgd)
            if n_sma >= 5:
                mode, scale = 2.0, -step_size * lr
            elif step_size > 0:
                mode, scale = 1.0, -step_size * lr
            else:
                mode, scale = 0.0, 0.0
        rows.append([decay, scale, bias_correction2**0.5, adabelief_scale_inv(t, beta2), mode])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(steps), 5).to(device, non_blocking=True)


def adabelief_hist(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: HistTarget | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    weight_decouple: bool,
    fixed_decay: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
) -> None:
    """:func:`fasthist.reference.adabelief.adabelief_reference` (same arguments) in one fused
    launch per dtype (module docstring), for what :mod:`fasthist.dispatch` gives it
    (float32/bfloat16 parameters)."""
    if not params:
        return
    n = len(params)
    device = params[0].device
    check_call("AdaBelief", n, {}, device, hist)
    with torch.no_grad():
        torch._foreach_add_(state_steps, 1)
        steps = [int(s.item()) for s in state_steps]  # CPU step counts, as the reference
        lr = float(lr)
        coef = _coefficients(
            steps,
            device,
            lr,
            beta1,
            beta2,
            float(weight_decay),
            weight_decouple,
            fixed_decay,
            rectify,
            degenerated_to_sgd,
        )
        columns = [params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars if amsgrad else [None] * n]
        plan = plan_groups("AdaBelief", device, columns)
        if weight_decouple:
            wd_mode = 2 if (weight_decay if fixed_decay else lr * weight_decay) != 0 else 0
        else:
            wd_mode = 1 if weight_decay != 0 else 0
        scalars = (float(beta1), 1 - float(beta1), float(beta2), 1 - float(beta2), float(eps), float(weight_decay))
        launch(
            _adabelief_hist_kernel,
            plan,
            hist,
            lambda tables, scratch: (tables.table, tables.chunks, scratch, coef, *scalars),
            {"AMSGRAD": bool(amsgrad), "RECTIFY": bool(rectify), "WD_MODE": wd_mode},
            device,
        )
        write_back(plan)
