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
    x      = v / c                                   # v = s_max (amsgrad, not rectify) or s;
                                                     # c = (1 - beta2**t) / (1 - beta2): histogrammed
    mode 3 (rectify=False):  p = p + (scale * m) / (sqrt_rn(v) / sqrt(1 - beta2**t) + eps)
    mode 2 (rectified):      p = p + (scale * m) / (sqrt_rn(s) + eps)
    mode 1 (SGD warm-up):    p = fma(m, scale, p)
    mode 0 (no update, or lr == 0)

``scale``, ``c``, ``decay`` and the mode are per tensor, computed on the host in float64 from
the step count as the reference does (AdaBelief's step counts live on the CPU). The FMAs are
the ones torch's CPU kernels make, so ``m``, ``s``, ``s_max`` and the histograms match the
reference backend bit for bit, and ``p`` within an ulp or two (torch's CPU sqrt is not
correctly rounded). float16 parameters (stepped in float32 with float32 states, as the
package does) and float64 parameters run on the reference backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.reference.adabelief import adabelief_reference, adabelief_scale, adabelief_step_size
from fasthist.reference.histogram import HistTarget

from ._common import BinSpec, bin_index, finalize_histograms, flush_histogram, launch_options, scratch_for, tl_dtype
from .rmsprop import BLOCK, CHUNK, ITERS, NO_BINS, NUM_WARPS, plan_groups, write_back

__all__ = ["adabelief_hist"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _adabelief_hist_kernel(
    table_ptr,  # int64 [n, 7]: param, grad, exp_avg, exp_avg_var, max_exp_avg_var, numel, slot
    chunk_ptr,  # int64 [num_chunks, 2]: table row, first element
    coef_ptr,  # float32 [num_slots, 5]: decay, scale, sqrt(1 - beta2**t), c, mode
    scratch_ptr,  # int64 [num_slots, NUM_BINS]
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    AMSGRAD: tl.constexpr,
    RECTIFY: tl.constexpr,
    WD_MODE: tl.constexpr,  # 0 none, 1 coupled, 2 decoupled
    TRACK: tl.constexpr,
    SHIFT: tl.constexpr,
    LOW_KEY: tl.constexpr,
    ABOVE: tl.constexpr,
    NONFINITE: tl.constexpr,
    NUM_BINS: tl.constexpr,
    HIST_BINS: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(chunk_ptr + 2 * pid)
    start = tl.load(chunk_ptr + 2 * pid + 1)
    row = table_ptr + 7 * tid
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    s_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE))
    numel = tl.load(row + 5)
    slot = tl.load(row + 6)
    decay = tl.load(coef_ptr + 5 * slot)
    scale = tl.load(coef_ptr + 5 * slot + 1)
    sqrt_bc2 = tl.load(coef_ptr + 5 * slot + 2)
    c = tl.load(coef_ptr + 5 * slot + 3)
    mode = tl.load(coef_ptr + 5 * slot + 4)
    if AMSGRAD:
        smax_ptr = tl.load(row + 4).to(tl.pointer_type(DTYPE))
    acc = tl.zeros([HIST_BINS], dtype=tl.int32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if WD_MODE == 2:
            p = (p * decay).to(DTYPE).to(tl.float32)
        if WD_MODE == 1:
            g = tl.fma(p, weight_decay, g).to(DTYPE).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = (m * beta1).to(DTYPE).to(tl.float32)
        m = tl.fma(g, one_minus_beta1, m).to(DTYPE)
        tl.store(m_ptr + offs, m, mask=mask)
        mf = m.to(tl.float32)
        r = (g - mf).to(DTYPE).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = (s * beta2).to(DTYPE).to(tl.float32)
        s = tl.fma(one_minus_beta2 * r, r, s).to(DTYPE).to(tl.float32)
        s = (s + eps).to(DTYPE)
        tl.store(s_ptr + offs, s, mask=mask)
        sf = s.to(tl.float32)
        v = sf
        if AMSGRAD:
            smax = tl.load(smax_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            smax = tl.maximum(smax, sf, propagate_nan=tl.PropagateNan.ALL)
            tl.store(smax_ptr + offs, smax.to(DTYPE), mask=mask)
            if not RECTIFY:
                v = smax
        x = tl.div_rn(v, c)
        # the update: one of four modes per tensor (scalar), all lanes alike
        unrect = (tl.div_rn(tl.sqrt_rn(v).to(DTYPE).to(tl.float32), sqrt_bc2).to(DTYPE).to(tl.float32) + eps).to(DTYPE)
        rect = (tl.sqrt_rn(sf).to(DTYPE).to(tl.float32) + eps).to(DTYPE)
        denom = tl.where(mode == 3.0, unrect.to(tl.float32), rect.to(tl.float32))
        denom = tl.where(mode >= 2.0, denom, 1.0)  # unused: keep 0/0 (eps=0, s=0) out of the lanes
        adaptive = p + tl.div_rn(scale * mf, denom)
        sgd = tl.fma(mf, scale, p)
        p = tl.where(mode >= 2.0, adaptive, tl.where(mode == 1.0, sgd, p))
        tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
        if TRACK:
            idx = bin_index(x, SHIFT, LOW_KEY, ABOVE, NONFINITE)
            acc += tl.histogram(idx, HIST_BINS, mask=mask)
    if TRACK:
        flush_histogram(acc, scratch_ptr + slot * NUM_BINS, NUM_BINS, HIST_BINS)


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
        rows.append([decay, scale, bias_correction2**0.5, adabelief_scale(t, beta2), mode])
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
    launch per dtype (module docstring)."""
    if not params:
        return
    kwargs = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        weight_decouple=weight_decouple,
        fixed_decay=fixed_decay,
        rectify=rectify,
        degenerated_to_sgd=degenerated_to_sgd,
    )
    if any(p.dtype not in _KERNEL_DTYPES for p in params) or any(g.is_sparse for g in grads):
        adabelief_reference(params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, hist=hist, **kwargs)
        return
    n = len(params)
    device = params[0].device
    if hist is not None and hist.step.device != device:
        raise RuntimeError(f"fasthist AdaBelief: histograms on {hist.step.device}, but parameters on {device}")
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
        plan = plan_groups("AdaBelief", device, columns, CHUNK)
        scratch = scratch_for(hist, n) if hist is not None else None
        bin_kwargs = BinSpec(hist.bins).kwargs() if hist is not None else NO_BINS
        if weight_decouple:
            wd_mode = 2 if (weight_decay if fixed_decay else lr * weight_decay) != 0 else 0
        else:
            wd_mode = 1 if weight_decay != 0 else 0
        for dtype, tables in plan.groups:
            if tables.num_chunks == 0:
                continue
            _adabelief_hist_kernel[(tables.num_chunks,)](
                tables.table,
                tables.chunks,
                coef,
                scratch if scratch is not None else tables.table,
                float(beta1),
                1 - float(beta1),
                float(beta2),
                1 - float(beta2),
                float(eps),
                float(weight_decay),
                DTYPE=tl_dtype(dtype),
                BLOCK=BLOCK,
                ITERS=ITERS,
                AMSGRAD=bool(amsgrad),
                RECTIFY=bool(rectify),
                WD_MODE=wd_mode,
                TRACK=scratch is not None,
                num_warps=NUM_WARPS,
                **bin_kwargs,
                **launch_options(device),
            )
        if hist is not None:
            finalize_histograms(hist, scratch, None)
        write_back(plan)
