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

The FMAs are the ones torch's CPU kernels make (``add(alpha=)``, ``addcmul``, ``lerp``;
``addcdiv`` computes ``a + (value * b) / c``), so ``v``, ``g_avg`` and the histograms match
the reference backend bit for bit; ``p`` and ``buf`` go through torch's CPU sqrt, which is
not correctly rounded, so they agree within an ulp or two. Nothing depends on the step
count, and a tensor ``lr`` is read on the device, so nothing is read from the host: the call
is capturable when the step counts live on the device. Launches: one per dtype plus the
histogram finalize launch (:mod:`fasthist.kernels._common`, which holds the host code all
four kernels share).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.target import HistTarget

from ._common import (
    check_call,
    chunk_header,
    column,
    hist_add,
    hist_begin,
    hist_end,
    launch,
    lerp_coefficients,
    load,
    plan_groups,
    rne,
    store,
    write_back,
)

__all__ = ["rmsprop_hist"]


@triton.jit
def _rmsprop_chunk(
    acc,
    p_ptr,
    g_ptr,
    v_ptr,
    ga_ptr,
    buf_ptr,
    numel,
    lr,
    alpha,
    one_minus_alpha,
    lerp_w,
    lerp_coeff,
    eps,
    weight_decay,
    momentum,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGNED: tl.constexpr,
    CENTERED: tl.constexpr,
    MOMENTUM: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    LERP_SMALL: tl.constexpr,
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
        if MAXIMIZE:
            g = -g
        p = load(p_ptr, offs, mask, MASKED, ALIGNED)
        if HAS_WD:
            g = rne(tl.fma(p, weight_decay, g), DTYPE).to(tl.float32)
        v = load(v_ptr, offs, mask, MASKED, ALIGNED)
        v = rne(v * alpha, DTYPE).to(tl.float32)
        v = rne(tl.fma(one_minus_alpha * g, g, v), DTYPE)
        store(v_ptr, offs, v, mask, MASKED, ALIGNED)
        d = v.to(tl.float32)
        if CENTERED:
            ga = load(ga_ptr, offs, mask, MASKED, ALIGNED)
            if LERP_SMALL:
                ga = tl.fma(lerp_w, g - ga, ga)
            else:
                ga = tl.fma(lerp_coeff, g - ga, g)
            ga = rne(ga, DTYPE)
            store(ga_ptr, offs, ga, mask, MASKED, ALIGNED)
            gaf = ga.to(tl.float32)
            d = rne(tl.fma(-gaf, gaf, d), DTYPE).to(tl.float32)
        x = tl.sqrt_rn(d)
        avg = rne((rne(x, DTYPE).to(tl.float32) + eps), DTYPE).to(tl.float32)
        if MOMENTUM:
            buf = load(buf_ptr, offs, mask, MASKED, ALIGNED)
            buf = rne(buf * momentum, DTYPE).to(tl.float32)
            buf = rne((buf + tl.div_rn(g, avg)), DTYPE)
            store(buf_ptr, offs, buf, mask, MASKED, ALIGNED)
            p = tl.fma(buf.to(tl.float32), -lr, p)
        else:
            p = p + tl.div_rn(-lr * g, avg)
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
def _rmsprop_hist_kernel(
    table_ptr,  # int64 [n, 7]: param, grad, square_avg, grad_avg, momentum_buffer, numel, slot
    chunk_ptr,  # int64 [num_chunks, 2]: table row, first element
    scratch_ptr,  # int64 [num_slots, NUM_BINS]
    lr_ptr,  # float32 [1] when LR_FROM_PTR (a tensor lr: no host read, capturable)
    lr,
    alpha,
    one_minus_alpha,
    lerp_w,  # float32(1 - alpha)
    lerp_coeff,  # lerp_w, or lerp_w - 1 when interpolating from the end (w >= 0.5)
    eps,
    weight_decay,
    momentum,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,
    CENTERED: tl.constexpr,
    MOMENTUM: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    LERP_SMALL: tl.constexpr,
    LR_FROM_PTR: tl.constexpr,
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
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr)
    p_ptr = column(row, 0, start, DTYPE)
    g_ptr = column(row, 1, start, DTYPE)
    v_ptr = column(row, 2, start, DTYPE)
    ga_ptr = column(row, 3, start, DTYPE)  # the parameter's own pointer when not centered
    buf_ptr = column(row, 4, start, DTYPE)  # likewise without momentum
    args = (p_ptr, g_ptr, v_ptr, ga_ptr, buf_ptr, numel, lr, alpha, one_minus_alpha, lerp_w, lerp_coeff, eps)
    if numel == BLOCK * ITERS:  # a full chunk: no masks
        acc = _rmsprop_chunk(
            acc, *args, weight_decay, momentum, DTYPE, BLOCK, ITERS, False, ALIGNED, CENTERED, MOMENTUM, MAXIMIZE,
            HAS_WD, LERP_SMALL, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS, WINDOW, DUMP, SMEM_BINS, WORD_ASM,
        )  # fmt: skip
    else:
        acc = _rmsprop_chunk(
            acc, *args, weight_decay, momentum, DTYPE, BLOCK, ITERS, True, ALIGNED, CENTERED, MOMENTUM, MAXIMIZE,
            HAS_WD, LERP_SMALL, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS, WINDOW, DUMP, SMEM_BINS, WORD_ASM,
        )  # fmt: skip
    if HIST != 0:
        hist_end(
            acc, row_ptr, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, NUM_BINS, HIST_BINS, WINDOW, DUMP, SMEM_BINS, SLAB
        )


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
    autograd, kernel dtypes); ``foreach`` and ``differentiable`` are accepted and ignored."""
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
        torch._foreach_add_(state_steps, 1)
        columns = [
            params,
            grads,
            square_avgs,
            grad_avgs if centered else [None] * n,
            momentum_buffer_list if momentum > 0 else [None] * n,
        ]
        plan = plan_groups("RMSprop", device, columns)
        w, coeff, small = lerp_coefficients(1 - alpha)
        lr_t = None
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise RuntimeError(
                    f"fasthist RMSprop: lr must be a float or a one-element Tensor, but got shape {tuple(lr.shape)}"
                )
            lr_t = lr.detach().to(device=device, dtype=torch.float32).reshape(1)
        lr_f = 0.0 if lr_t is not None else float(lr)
        scalars = (lr_f, float(alpha), 1 - float(alpha), w, coeff, float(eps), float(weight_decay), float(momentum))
        launch(
            _rmsprop_hist_kernel,
            plan,
            hist,
            lambda tables, scratch: (
                tables.table,
                tables.chunks,
                scratch,
                lr_t if lr_t is not None else tables.table,
                *scalars,
            ),
            {
                "CENTERED": bool(centered),
                "MOMENTUM": momentum > 0,
                "MAXIMIZE": bool(maximize),
                "HAS_WD": weight_decay != 0,
                "LERP_SMALL": small,
                "LR_FROM_PTR": lr_t is not None,
            },
            device,
        )
        write_back(plan)
