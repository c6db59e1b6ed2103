r"""Reference AdaBelief step (Zhuang et al., NeurIPS 2020) with histograms of the value ε
competes with, written line by line as ``adabelief_pytorch.AdaBelief`` (v0.2) computes it.

Per tensor, with ``t`` the step count after the increment and ``r = g - m_t``::

    decay:  p *= 1 - lr*wd  (weight_decouple)  |  p *= 1 - wd  (fixed_decay)  |  g += wd*p
    m_t  = beta1*m + (1-beta1)*g
    s_t  = beta2*s + (1-beta2)*r*r
    s_t += eps                                    # stored: eps enters the state every step
    s_max = max(s_max, s_t)                       # amsgrad only
    rectify=False:  p -= lr/(1-beta1**t) * m_t / (sqrt(s or s_max)/sqrt(1-beta2**t) + eps)
    rectify=True:   RAdam's rho_t; rho_t >= 5: p -= lr*step_size * m_t / (sqrt(s_t) + eps)
                    (s_t even with amsgrad, as the package does); else SGD with momentum
                    (degenerated_to_sgd) or no update.

The histogrammed value, per tensor::

    v     = s_max if (amsgrad and not rectify) else s_t     # what the denominator uses
    c     = (1 - beta2**t) / (1 - beta2)                    # float64 on the host
    x     = float32(v) * (float32(1) / float32(c))          # (1-beta2) * s_hat, no sqrt, no division
    hist += bins of x

Why this value: ``s_t = (1-beta2)*sum_k beta2**(t-k)*r_k**2 + eps*(1-beta2**t)/(1-beta2)``,
so ``(1-beta2)*s_hat_t = (1-beta2)*EMA_hat(r**2) + eps``: the bias-corrected average of
the per-step increments ``(1-beta2)*r**2 + eps``. ε is one of those increments, so it is
compared with ``(1-beta2)*EMA_hat(r**2)`` in its own units; an element whose ``x`` is
near ε (the histogram's floor) is ε-dominated, one with ``x >> ε`` is adaptive. The
second ε, outside the square root, never matters for ``eps < 1``: ``s_t >= eps`` makes
``sqrt(s_t) >= sqrt(eps) >> eps``. The value includes ε itself (the stored state does,
and subtracting it back in float32 would cancel); read the floor at ε accordingly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..declaration import HistInputs
from . import reference_step

__all__ = [
    "adabelief_hist_inputs",
    "adabelief_reference",
    "adabelief_update",
    "adabelief_scale",
    "adabelief_scale_inv",
    "adabelief_step_size",
]


def adabelief_step_size(step: int, beta1: float, beta2: float, degenerated_to_sgd: bool) -> tuple[float, float]:
    """RAdam's ``(N_sma, step_size)`` for the rectified update, as the package computes them."""
    beta2_t = beta2**step
    n_sma_max = 2 / (1 - beta2) - 1
    n_sma = n_sma_max - 2 * step * beta2_t / (1 - beta2_t)
    if n_sma >= 5:
        step_size = math.sqrt(
            (1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma * n_sma_max / (n_sma_max - 2)
        ) / (1 - beta1**step)
    elif degenerated_to_sgd:
        step_size = 1.0 / (1 - beta1**step)
    else:
        step_size = -1
    return n_sma, step_size


def adabelief_scale(step: int, beta2: float) -> float:
    """``(1 - beta2**step) / (1 - beta2)``: the histogram shows ``(1 - beta2) * s_hat = s / scale``."""
    return (1 - beta2**step) / (1 - beta2)


def adabelief_scale_inv(step: int, beta2: float) -> float:
    """``float32(1) / float32(adabelief_scale(step, beta2))`` (IEEE, float32): the histogram's
    multiplier. ``s * scale_inv`` is within 1.5 ulp of ``s / scale`` (2**-22 relative, far
    below the bins' width) and costs every backend a multiply instead of a division."""
    return float(np.float32(1.0) / np.float32(adabelief_scale(step, beta2)))


def _weight_decay(
    p: Tensor, grad: Tensor, lr: float, weight_decay: float, weight_decouple: bool, fixed_decay: bool
) -> Tensor:
    """The weight decay: ``p *= 1 - lr*wd`` (weight_decouple), ``p *= 1 - wd`` (weight_decouple
    and fixed_decay), else ``g + wd*p``; returns the gradient the moments see."""
    if weight_decouple:
        p.mul_(1.0 - (weight_decay if fixed_decay else lr * weight_decay))
    elif weight_decay != 0:
        grad = grad.add(p, alpha=weight_decay)  # the package adds in place into p.grad
    return grad


def _moments_(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_var: Tensor,
    max_exp_avg_var: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """``m = beta1*m + (1-beta1)*g``; ``s = beta2*s + (1-beta2)*(g-m)**2 + eps`` (eps enters
    the state); ``s_max = max(s_max, s)`` when ``max_exp_avg_var`` is given (amsgrad)."""
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    grad_residual = grad - exp_avg
    exp_avg_var.mul_(beta2).addcmul_(grad_residual, grad_residual, value=1 - beta2)
    exp_avg_var.add_(eps)
    if max_exp_avg_var is not None:
        torch.max(max_exp_avg_var, exp_avg_var, out=max_exp_avg_var)


def _update_(
    p: Tensor,
    exp_avg: Tensor,
    exp_avg_var: Tensor,
    var: Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    rectify: bool,
    degenerated_to_sgd: bool,
) -> None:
    """The parameter update of step ``step`` (the kernel's modes): none when ``lr == 0``;
    ``p -= lr/(1-beta1**t) * m / (sqrt(var)/sqrt(1-beta2**t) + eps)`` unrectified (``var``:
    s, or s_max with amsgrad); rectified, ``p -= lr*step_size * m / (sqrt(s) + eps)`` when
    RAdam's ``N_sma >= 5``, else SGD with momentum (degenerated_to_sgd) or nothing."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    if lr == 0:
        pass  # the update would be 0 * (m / denom): skipped, so eps=0 cannot make 0/0 a NaN
    elif not rectify:
        denom = (var.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    else:
        n_sma, step_size = adabelief_step_size(step, beta1, beta2, degenerated_to_sgd)
        if n_sma >= 5:
            denom = exp_avg_var.sqrt().add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size * lr)
        elif step_size > 0:
            p.add_(exp_avg, alpha=-step_size * lr)


def adabelief_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
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
    """One AdaBelief step over the tensors. fp16 parameters are stepped in float32 with
    float32 states (as the package does); every other dtype in its own. With ``lr == 0``
    only the moments (and a ``fixed_decay`` weight decay) change: the package would add
    ``-0.0 * m/denom``, which is NaN where ``eps == 0`` and ``s == 0``."""
    lr = float(lr)
    for i, param in enumerate(params):
        grad = grads[i]
        if grad.is_sparse:
            raise RuntimeError("AdaBelief does not support sparse gradients, please consider SparseAdam instead")
        half = param.dtype == torch.float16
        p = param.float() if half else param
        if half:
            grad = grad.float()
        exp_avg, exp_avg_var = exp_avgs[i], exp_avg_vars[i]
        grad = _weight_decay(p, grad, lr, weight_decay, weight_decouple, fixed_decay)
        state_steps[i] += 1
        step = int(state_steps[i].item())
        _moments_(grad, exp_avg, exp_avg_var, max_exp_avg_vars[i] if amsgrad else None, beta1, beta2, eps)
        var = max_exp_avg_vars[i] if amsgrad else exp_avg_var
        _update_(p, exp_avg, exp_avg_var, var, step, lr, beta1, beta2, eps, rectify, degenerated_to_sgd)
        if half:
            param.copy_(p)


def adabelief_hist_inputs(lists: list[list[Tensor]], kwargs: dict[str, Any]) -> HistInputs:
    """After the update: ``s`` (``s_max`` with amsgrad and not rectify) and the multipliers
    :func:`adabelief_scale_inv` of each tensor's step count; the histogram holds ``s * scale_inv``."""
    _, _, _, exp_avg_vars, max_exp_avg_vars, state_steps = lists
    values = max_exp_avg_vars if (kwargs["amsgrad"] and not kwargs["rectify"]) else exp_avg_vars
    scales = [adabelief_scale_inv(int(s.item()), kwargs["beta2"]) for s in state_steps]
    return [v.detach() for v in values], scales, None


#: :func:`adabelief_update` (same keyword arguments), then the histogram pass in torch ops.
adabelief_reference = reference_step(adabelief_update, adabelief_hist_inputs, sqrt=False, reciprocal=True)
