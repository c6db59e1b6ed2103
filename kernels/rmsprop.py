r"""Fused RMSprop step that also histograms the value ε is added to, of every element.

Per element, in float32 with every torch op's result rounded to the state dtype (a no-op for
float32), ``p, g, v[, g_avg][, buf]`` loaded once and written once::

    g      = -g                                      # maximize
    g      = fma(p, weight_decay, g)                 # grad.add(param, alpha=weight_decay)
    v      = fma((1 - alpha) * g, g, v * alpha)      # square_avg.mul_(alpha).addcmul_(g, g, 1 - alpha)
    g_avg  = lerp(g_avg, g, 1 - alpha)               # centered
    d      = fma(-g_avg, g_avg, v)  |  v             # square_avg.addcmul(g_avg, g_avg, value=-1)
    x      = sqrt_rn(d)                              # the value eps is added to: histogrammed
    avg    = x + eps
    buf    = buf * momentum + g / avg;  p = fma(buf, -lr, p)      # momentum > 0
    p      = p + (-lr * g) / avg                                  # otherwise (torch's addcdiv)
    s      = |g| / max(x, eps)       # staleness, only when hist.staleness is given (IEEE division)
    stale += LogBins index of s

The FMAs are the ones torch's CPU kernels make (``add(alpha=)``, ``addcmul``, ``lerp``;
``addcdiv`` computes ``a + (value * b) / c``), so ``v``, ``g_avg`` and the histograms match
the reference backend bit for bit; ``p`` and ``buf`` go through torch's CPU sqrt, which is
not correctly rounded, so they agree within an ulp or two. One exception: with weight decay
on bfloat16/float16 parameters torch's CPU ``add(alpha=)`` rounds ``alpha`` to the tensor's
dtype (``bf16(0.1) = 0.10009765625``) where this kernel multiplies by the float32 value (as
torch's CUDA op does with its float32 ``opmath`` alpha, by its source; not measured on a GPU
here), so under the interpreter those ``g`` (and ``v``, the histograms) can differ from the
CPU reference by an ulp of the dtype. Nothing depends on the step
count, and a tensor ``lr`` is read on the device, so nothing is read from the host: the call
is capturable when the step counts live on the device. Launches: one per dtype of the shared
:func:`~fasthist.kernels._common.fused_step_kernel` with this file's update body, plus the
histogram finalize launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.target import HistTarget

from ._common import StepBody, check_call, launch, lerp_coefficients, load, plan_groups, rne, store

__all__ = ["BODY", "RMSpropFlags", "rmsprop_hist"]


class RMSpropFlags(NamedTuple):
    """The structural switches of the RMSprop kernel (``FLAGS``)."""

    CENTERED: bool
    MOMENTUM: bool
    MAXIMIZE: bool
    HAS_WD: bool
    LERP_SMALL: bool  # g_avg.lerp_(g, w) as fma(w, g - g_avg, g_avg); else from the end (w >= 0.5)
    LR_FROM_PTR: bool  # a tensor lr, read on the device (coef): no host read, capturable


@triton.jit
def _rmsprop_prepare(coef, s, grad_scale, FLAGS: tl.constexpr):
    """Per program: ``lr`` (the tensor's value when ``LR_FROM_PTR``), then the scalars ``alpha``,
    ``1 - alpha``, the lerp weight ``float32(1 - alpha)`` and coefficient, ``eps``,
    ``weight_decay``, ``momentum``."""
    lr = s[0]
    if FLAGS.LR_FROM_PTR:
        lr = tl.load(coef)
    return (lr, s[1], s[2], s[3], s[4], s[5], s[6], s[7])


@triton.jit
def _rmsprop_update(
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
    p_ptr, g_ptr, v_ptr, ga_ptr, buf_ptr = cols  # ga, buf: the parameter's own pointer when unused
    lr, alpha, one_minus_alpha, lerp_w, lerp_coeff, eps, weight_decay, momentum = k
    g = load(g_ptr, offs, mask, MASKED, ALIGNED)
    if FLAGS.MAXIMIZE:
        g = -g
    p = load(p_ptr, offs, mask, MASKED, ALIGNED)
    if FLAGS.HAS_WD:
        g = rne(tl.fma(p, weight_decay, g), DTYPE).to(tl.float32)
    v = load(v_ptr, offs, mask, MASKED, ALIGNED)
    v = rne(v * alpha, DTYPE).to(tl.float32)
    v = rne(tl.fma(one_minus_alpha * g, g, v), DTYPE)
    store(v_ptr, offs, v, mask, MASKED, ALIGNED)
    d = v.to(tl.float32)
    if FLAGS.CENTERED:
        ga = load(ga_ptr, offs, mask, MASKED, ALIGNED)
        if FLAGS.LERP_SMALL:
            ga = tl.fma(lerp_w, g - ga, ga)
        else:
            ga = tl.fma(lerp_coeff, g - ga, g)
        ga = rne(ga, DTYPE)
        store(ga_ptr, offs, ga, mask, MASKED, ALIGNED)
        gaf = ga.to(tl.float32)
        d = rne(tl.fma(-gaf, gaf, d), DTYPE).to(tl.float32)
    x = tl.sqrt_rn(d)
    avg = rne((rne(x, DTYPE).to(tl.float32) + eps), DTYPE).to(tl.float32)
    if FLAGS.MOMENTUM:
        buf = load(buf_ptr, offs, mask, MASKED, ALIGNED)
        buf = rne(buf * momentum, DTYPE).to(tl.float32)
        buf = rne((buf + tl.div_rn(g, avg)), DTYPE)
        store(buf_ptr, offs, buf, mask, MASKED, ALIGNED)
        p = tl.fma(buf.to(tl.float32), -lr, p)
    else:
        p = p + tl.div_rn(-lr * g, avg)
    store(p_ptr, offs, rne(p, DTYPE), mask, MASKED, ALIGNED)
    return x, g


@triton.jit
def _rmsprop_staleness(x, g, k):
    """``g / max(x, eps)`` in float32, correctly rounded (``div.rn.f32``), ``g`` as it entered
    ``v`` (rounded to the state dtype with weight decay, as torch's op rounds it); a NaN
    ``x`` gives NaN. Binned by magnitude, so the sign of ``g`` does not matter (as Adam's)."""
    eps = k[5]
    return tl.div_rn(g, tl.maximum(x, eps, propagate_nan=tl.PropagateNan.ALL))


BODY = StepBody(_rmsprop_prepare, _rmsprop_update, RMSpropFlags, 0, _rmsprop_staleness)


def rmsprop_hist(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: HistTarget | None,
    lr: float | Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
) -> None:
    """``torch.optim.rmsprop.rmsprop`` (same arguments) in one fused launch per dtype, plus
    the histograms (module docstring), for what :mod:`fasthist.dispatch` gives it (no
    autograd, kernel dtypes) as :mod:`fasthist.backend` readies it (the step counts already
    incremented, a tensor ``lr`` one value); ``foreach`` and ``differentiable`` are accepted
    and ignored."""
    if not params:
        return
    n = len(params)
    device = params[0].device
    lists = {"grads": grads, "square_avgs": square_avgs, "state_steps": state_steps}
    if centered:
        lists["grad_avgs"] = grad_avgs
    if momentum > 0:
        lists["momentum_buffer_list"] = momentum_buffer_list
    check_call("RMSprop", n, lists, device, hist)
    with torch.no_grad():
        columns = [
            params,
            grads,
            square_avgs,
            grad_avgs if centered else [None] * n,
            momentum_buffer_list if momentum > 0 else [None] * n,
        ]
        plan = plan_groups("RMSprop", device, columns)
        w, coeff, small = lerp_coefficients(1 - alpha)
        lr_t = lr.to(device=device, dtype=torch.float32).reshape(1) if isinstance(lr, Tensor) else None
        lr_f = 0.0 if lr_t is not None else float(lr)
        launch(
            BODY,
            RMSpropFlags(bool(centered), momentum > 0, bool(maximize), weight_decay != 0, small, lr_t is not None),
            plan,
            hist,
            device,
            scalars=(lr_f, alpha, 1 - float(alpha), w, coeff, eps, weight_decay, momentum),
            coef=lr_t,
        )
