r"""Fused Adagrad step that also histograms :math:`\sqrt{\sum g^2}` of every element.

Per element, in float32 with every torch op's result rounded to the state dtype (a no-op for
float32), ``p, g, sum`` loaded once and written once::

    g      = grad / grad_scale                       # fused + GradScaler; written back
    g      = -g                                      # maximize
    g      = fma(p, weight_decay, g)                 # grad.add(param, alpha=weight_decay)
    sum    = fma(g, g, sum)                          # state_sum.addcmul_(g, g, value=1)
    x      = sqrt_rn(sum)                            # the value eps is added to: histogrammed
    p      = p + (-clr * g) / (x + eps)              # torch's addcdiv; clr = lr / (1 + (t-1)*lr_decay)

The FMAs are the ones torch's CPU kernels make, so ``sum`` and the histograms match the
reference backend bit for bit, and ``p`` within an ulp or two (torch's CPU sqrt is not
correctly rounded). ``clr`` is computed where torch computes it: on the host in float64 when
the step counts live on the CPU, on the device in float32 otherwise. ``found_inf`` nonzero
masks every load and store of the step on the device (parameters, sums and histograms stay
untouched; the step counts' increment and rollback are :mod:`fasthist.backend`'s). Sparse gradients never reach it (:mod:`fasthist.dispatch`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.target import HistTarget

from ._common import StepBody, check_call, launch, load, plan_groups, rne, scalar, store

__all__ = ["BODY", "AdagradFlags", "adagrad_hist"]


class AdagradFlags(NamedTuple):
    """The structural switches of the Adagrad kernel (``FLAGS``)."""

    MAXIMIZE: bool
    HAS_WD: bool


@triton.jit
def _adagrad_prepare(coef, s, grad_scale, FLAGS: tl.constexpr):
    """Per program: ``-clr`` of its tensor (``coef``), the grad scale, the scalars ``eps``, ``weight_decay``."""
    return (tl.load(coef), grad_scale, s[0], s[1])


@triton.jit
def _adagrad_update(
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
    p_ptr, g_ptr, s_ptr = cols[0], cols[1], cols[2]
    neg_clr, grad_scale, eps, weight_decay = k
    g = load(g_ptr, offs, mask, MASKED, ALIGNED)
    if HAS_GRAD_SCALE:
        g = rne(tl.div_rn(g, grad_scale), DTYPE)
        store(g_ptr, offs, g, mask, MASKED, ALIGNED)
        g = g.to(tl.float32)
    if FLAGS.MAXIMIZE:
        g = -g
    p = load(p_ptr, offs, mask, MASKED, ALIGNED)
    if FLAGS.HAS_WD:
        g = rne(tl.fma(p, weight_decay, g), DTYPE).to(tl.float32)
    s = load(s_ptr, offs, mask, MASKED, ALIGNED)
    s = rne(tl.fma(g, g, s), DTYPE)
    store(s_ptr, offs, s, mask, MASKED, ALIGNED)
    x = tl.sqrt_rn(s.to(tl.float32))
    std = rne((rne(x, DTYPE).to(tl.float32) + eps), DTYPE).to(tl.float32)
    p = p + tl.div_rn(neg_clr * g, std)
    store(p_ptr, offs, rne(p, DTYPE), mask, MASKED, ALIGNED)
    return x, g


BODY = StepBody(_adagrad_prepare, _adagrad_update, AdagradFlags, 1)


def _neg_clr(state_steps: list[Tensor], device: torch.device, lr: float | Tensor, lr_decay: float) -> Tensor:
    """float32 ``-lr / (1 + (step - 1) * lr_decay)`` per tensor, after the increment."""
    if all(s.device.type == "cpu" for s in state_steps) and not (isinstance(lr, Tensor) and lr.device.type != "cpu"):
        lr_f = scalar(lr, "lr", "Adagrad")
        values = [-(lr_f / (1 + (float(s) - 1) * lr_decay)) for s in state_steps]
        return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)
    steps = torch.stack([s.detach().reshape(()) for s in state_steps]).to(device=device, dtype=torch.float32)
    lr_t = lr.to(device=device, dtype=torch.float32) if isinstance(lr, Tensor) else lr
    return (-(lr_t / (1 + (steps - 1) * lr_decay))).to(torch.float32).contiguous()


def adagrad_hist(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: HistTarget | None,
    lr: float | Tensor,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    maximize: bool,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_sparse_grad: bool = False,
    foreach: bool | None = None,
    differentiable: bool = False,
    has_complex: bool = False,
) -> None:
    """``torch.optim.adagrad.adagrad`` (same arguments) in one fused launch per dtype, plus
    the histograms (module docstring), for what :mod:`fasthist.dispatch` gives it (dense
    gradients, no autograd, kernel dtypes) as :mod:`fasthist.backend` readies it (the step
    counts already incremented and decremented by ``found_inf`` after; ``found_inf`` and
    ``grad_scale`` None or one value on the parameters' device);
    ``foreach``/``fused``/``differentiable``/``has_sparse_grad`` are accepted and ignored."""
    if not params:
        return
    n = len(params)
    device = params[0].device
    check_call("Adagrad", n, {"grads": grads, "state_sums": state_sums, "state_steps": state_steps}, device, hist)
    with torch.no_grad():
        neg_clr = _neg_clr(state_steps, device, lr, float(lr_decay))
        plan = plan_groups("Adagrad", device, [params, grads, state_sums, [None] * n, [None] * n])
        launch(
            BODY,
            AdagradFlags(bool(maximize), weight_decay != 0),
            plan,
            hist,
            device,
            scalars=(eps, weight_decay),
            coef=neg_clr,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
