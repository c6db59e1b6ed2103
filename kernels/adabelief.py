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

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.reference.adabelief import adabelief_scale_inv, adabelief_step_size
from fasthist.target import HistTarget

from ._common import StepBody, check_call, launch, load, plan_groups, rne, store

__all__ = ["BODY", "AdaBeliefFlags", "adabelief_hist"]


class AdaBeliefFlags(NamedTuple):
    """The structural switches of the AdaBelief kernel (``FLAGS``)."""

    AMSGRAD: bool
    RECTIFY: bool
    WD_MODE: int  # 0 none, 1 coupled, 2 decoupled


@triton.jit
def _adabelief_prepare(coef, s, grad_scale, FLAGS: tl.constexpr):
    """Per program: its tensor's ``decay``, ``scale``, ``sqrt(1 - beta2**t)``, ``float32(1/c)``
    and mode (``coef``), then the scalars ``beta1``, ``1 - beta1``, ``beta2``, ``1 - beta2``,
    ``eps``, ``weight_decay``."""
    return (
        tl.load(coef),
        tl.load(coef + 1),
        tl.load(coef + 2),
        tl.load(coef + 3),
        tl.load(coef + 4),
        s[0],
        s[1],
        s[2],
        s[3],
        s[4],
        s[5],
    )


@triton.jit
def _adabelief_update(
    cols,
    offs,
    mask,
    k,
    FLAGS: tl.constexpr,
    DTYPE: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """One block of the update (module docstring); returns ``x``, the value histogrammed, and
    ``g`` as it entered the second moment."""
    p_ptr, g_ptr, m_ptr, s_ptr, smax_ptr = cols  # smax: the parameter's own pointer without amsgrad
    decay, scale, sqrt_bc2, c_inv, mode, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay = k
    g = load(g_ptr, offs, mask, MASKED, ALIGNED)
    p = load(p_ptr, offs, mask, MASKED, ALIGNED)
    if FLAGS.WD_MODE == 2:
        p = rne(p * decay, DTYPE).to(tl.float32)
    if FLAGS.WD_MODE == 1:
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
    if FLAGS.AMSGRAD:
        smax = load(smax_ptr, offs, mask, MASKED, ALIGNED)
        smax = tl.maximum(smax, sf, propagate_nan=tl.PropagateNan.ALL)
        store(smax_ptr, offs, rne(smax, DTYPE), mask, MASKED, ALIGNED)
        if not FLAGS.RECTIFY:
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
    return x, g


BODY = StepBody(_adabelief_prepare, _adabelief_update, AdaBeliefFlags, 5)


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
        launch(
            BODY,
            AdaBeliefFlags(bool(amsgrad), bool(rectify), wd_mode),
            plan,
            hist,
            device,
            scalars=(beta1, 1 - float(beta1), beta2, 1 - float(beta2), eps, weight_decay),
            coef=coef,
        )
