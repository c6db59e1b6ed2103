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
    s      = |g| / max(x, eps)                      # staleness, only when hist.staleness is given:
    stale += LogBins index of s                     # IEEE division (div.rn.f32), NaN x gives NaN

``g`` in ``s`` is the float32 value fed into ``v`` above (unscaled, negated, with coupled
weight decay, unrounded also for bfloat16/float16 parameters, as in torch's fused kernels);
``x`` the same float32 value the first histogram bins, ``eps`` the float32 one it adds.

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

Launches per call: one main launch per parameter dtype of the shared
:func:`~fasthist.kernels._common.fused_step_kernel` with this file's update body (a table of
tensor pointers and chunk descriptors, cached while the tensors are unchanged; one program
per chunk of ``SHAPE.chunk`` elements of one tensor, its histogram flushed once per program
with atomics on non-zero bins only), one finalize launch for the histogram windows, and the
few ``torch`` ops that compute the coefficients (on the device when capturable).
``grad_scale``/``found_inf`` follow torch's fused Adam: grads are unscaled in place, and
``found_inf`` nonzero masks every load and store on the device, so parameters, states and
histograms stay untouched without a host sync; the step counts' increment and rollback are
:mod:`fasthist.backend`'s, around this call.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.reference.adam import bias_correction2_sqrt
from fasthist.target import HistTarget

from ._common import (
    StepBody,
    check_call,
    configure,
    launch,
    lerp_coefficients,
    load,
    plan_groups,
    rne,
    scalar,
    store,
)

__all__ = ["BODY", "AdamFlags", "adam_hist", "configure"]


class AdamFlags(NamedTuple):
    """The structural switches of the Adam kernel (``FLAGS``)."""

    AMSGRAD: bool
    MAXIMIZE: bool
    WD_MODE: int  # 0 none, 1 coupled (Adam), 2 decoupled (AdamW)
    LERP_SMALL: bool  # m.lerp_(g, w) as fma(w, g - m, m); else fma(w - 1, g - m, g) (w >= 0.5)


@triton.jit
def _adam_prepare(coef, s, grad_scale, FLAGS: tl.constexpr):
    """Per program: ``-step_size``, ``c``, ``1 - lr*wd`` of its tensor (``coef``), the grad
    scale, then the scalars ``1 - beta1`` (the lerp weight), the lerp coefficient, ``beta2``,
    ``1 - beta2``, ``eps``, ``weight_decay``."""
    return (tl.load(coef), tl.load(coef + 1), tl.load(coef + 2), grad_scale, s[0], s[1], s[2], s[3], s[4], s[5])


@triton.jit
def _adam_update(
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
    ``g`` as it entered ``v``."""
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr = cols
    neg_step_size, c, decay, grad_scale, one_minus_beta1, lerp_coeff, beta2, one_minus_beta2, eps, weight_decay = k
    g = load(g_ptr, offs, mask, MASKED, ALIGNED)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
        store(g_ptr, offs, rne(g, DTYPE), mask, MASKED, ALIGNED)
    if FLAGS.MAXIMIZE:
        g = -g
    p = load(p_ptr, offs, mask, MASKED, ALIGNED)
    if FLAGS.WD_MODE == 1:
        g = tl.fma(p, weight_decay, g)
    if FLAGS.WD_MODE == 2:
        p = p * decay
    m = load(m_ptr, offs, mask, MASKED, ALIGNED)
    if FLAGS.LERP_SMALL:
        m = tl.fma(one_minus_beta1, g - m, m)
    else:
        m = tl.fma(lerp_coeff, g - m, g)
    m = rne(m, DTYPE)
    store(m_ptr, offs, m, mask, MASKED, ALIGNED)
    v = load(v_ptr, offs, mask, MASKED, ALIGNED)
    v = rne(tl.fma(one_minus_beta2 * g, g, v * beta2), DTYPE)
    store(v_ptr, offs, v, mask, MASKED, ALIGNED)
    v_den = v.to(tl.float32)
    if FLAGS.AMSGRAD:
        v_den = tl.maximum(load(vmax_ptr, offs, mask, MASKED, ALIGNED), v_den, propagate_nan=tl.PropagateNan.ALL)
        store(vmax_ptr, offs, rne(v_den, DTYPE), mask, MASKED, ALIGNED)
    x = tl.div_rn(tl.sqrt_rn(v_den), c)
    p = p + tl.div_rn(neg_step_size * m.to(tl.float32), x + eps)
    store(p_ptr, offs, rne(p, DTYPE), mask, MASKED, ALIGNED)
    return x, g


@triton.jit
def _adam_staleness(x, g, k):
    """``g / max(x, eps)`` in float32, correctly rounded (``div.rn.f32``); a NaN ``x`` gives
    NaN (as ``torch.maximum``/``clamp`` propagate it). The histogram bins magnitudes and IEEE
    division is symmetric in the sign, so this bins exactly as ``|g| / max(x, eps)``, one
    instruction less per element."""
    eps = k[8]
    return tl.div_rn(g, tl.maximum(x, eps, propagate_nan=tl.PropagateNan.ALL))


BODY = StepBody(_adam_prepare, _adam_update, AdamFlags, 3, _adam_staleness)


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
    parameters, host betas, no autograd) as :mod:`fasthist.backend` readies it: the step
    counts already incremented (and decremented by ``found_inf`` after), ``found_inf`` and
    ``grad_scale`` None or one value on the parameters' device. ``foreach``, ``fused`` and
    ``differentiable`` are accepted and ignored (the kernel is always multi-tensor and fused).
    """
    if not params:
        return
    device = params[0].device
    n = len(params)
    lengths = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "state_steps": state_steps}
    if amsgrad:
        lengths["max_exp_avg_sqs"] = max_exp_avg_sqs
    check_call("Adam", n, lengths, device, hist)
    beta1, beta2, weight_decay = scalar(beta1, "beta1", "Adam"), scalar(beta2, "beta2", "Adam"), float(weight_decay)
    with torch.no_grad():
        vmax = max_exp_avg_sqs if amsgrad else [None] * n
        plan = plan_groups("Adam", device, [params, grads, exp_avgs, exp_avg_sqs, vmax])
        # step counts on the host (torch's default) or on the device (capturable/fused)
        on_device = capturable or state_steps[0].device.type != "cpu"
        coef = _coefficients(state_steps, device, on_device, lr, beta1, beta2, weight_decay, decoupled_weight_decay)
        w, lerp_coeff, lerp_small = lerp_coefficients(1 - beta1)
        wd_mode = 0 if weight_decay == 0 else (2 if decoupled_weight_decay else 1)
        launch(
            BODY,
            AdamFlags(bool(amsgrad), bool(maximize), wd_mode, lerp_small),
            plan,
            hist,
            device,
            scalars=(w, lerp_coeff, beta2, 1 - beta2, float(eps), weight_decay),
            coef=coef,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
