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
masks every load and store of the step on the device (parameters, sums, step counts and
histograms stay untouched). Sparse gradients never reach it (:mod:`fasthist.dispatch`).
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
    load,
    plan_groups,
    rne,
    scalar,
    store,
    write_back,
)

__all__ = ["adagrad_hist"]


@triton.jit
def _adagrad_chunk(
    acc,
    p_ptr,
    g_ptr,
    s_ptr,
    numel,
    neg_clr,
    grad_scale,
    eps,
    weight_decay,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGNED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
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
    trips = ITERS
    if MASKED:  # the tail chunk: only its live blocks
        trips = tl.cdiv(numel, BLOCK)
    for it in range(trips):
        offs = it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = load(g_ptr, offs, mask, MASKED, ALIGNED)
        if HAS_GRAD_SCALE:
            g = rne(tl.div_rn(g, grad_scale), DTYPE)
            store(g_ptr, offs, g, mask, MASKED, ALIGNED)
            g = g.to(tl.float32)
        if MAXIMIZE:
            g = -g
        p = load(p_ptr, offs, mask, MASKED, ALIGNED)
        if HAS_WD:
            g = rne(tl.fma(p, weight_decay, g), DTYPE).to(tl.float32)
        s = load(s_ptr, offs, mask, MASKED, ALIGNED)
        s = rne(tl.fma(g, g, s), DTYPE)
        store(s_ptr, offs, s, mask, MASKED, ALIGNED)
        x = tl.sqrt_rn(s.to(tl.float32))
        std = rne((rne(x, DTYPE).to(tl.float32) + eps), DTYPE).to(tl.float32)
        p = p + tl.div_rn(neg_clr * g, std)
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
def _adagrad_hist_kernel(
    table_ptr,  # int64 [n, 5]: param, grad, sum, numel, slot
    chunk_ptr,  # int64 [num_chunks, 2]: table row, first element
    scratch_ptr,  # int64 [num_slots, NUM_BINS]
    clr_ptr,  # float32 [num_slots]: -clr
    grad_scale_ptr,
    found_inf_ptr,
    eps,
    weight_decay,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
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
    row, start, numel, slot = chunk_header(table_ptr, chunk_ptr, 5, BLOCK * ITERS)
    row_ptr = scratch_ptr + slot * NUM_BINS  # this program's histogram, zeroed first: fewer live registers
    acc = hist_begin(start < 0, row_ptr, HIST, HIST_BINS, DUMP, SMEM_BINS, SLAB)
    p_ptr = column(row, 0, start, DTYPE)
    g_ptr = column(row, 1, start, DTYPE)
    s_ptr = column(row, 2, start, DTYPE)
    neg_clr = tl.load(clr_ptr + slot)
    if HAS_FOUND_INF:  # a skipped step touches nothing: every element is masked off
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    if numel == BLOCK * ITERS:  # a full chunk: no masks
        acc = _adagrad_chunk(
            acc, p_ptr, g_ptr, s_ptr, numel, neg_clr, grad_scale, eps, weight_decay, DTYPE, BLOCK, ITERS, False,
            ALIGNED, MAXIMIZE, HAS_WD, HAS_GRAD_SCALE, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS, WINDOW, DUMP, SMEM_BINS, WORD_ASM,
        )  # fmt: skip
    else:
        acc = _adagrad_chunk(
            acc, p_ptr, g_ptr, s_ptr, numel, neg_clr, grad_scale, eps, weight_decay, DTYPE, BLOCK, ITERS, True,
            ALIGNED, MAXIMIZE, HAS_WD, HAS_GRAD_SCALE, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS, WINDOW, DUMP, SMEM_BINS, WORD_ASM,
        )  # fmt: skip
    if HIST != 0:
        hist_end(
            acc, row_ptr, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, NUM_BINS, HIST_BINS, WINDOW, DUMP, SMEM_BINS, SLAB
        )


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
    gradients, no autograd, kernel dtypes); ``foreach``/``fused``/``differentiable``/
    ``has_sparse_grad`` are accepted and ignored."""
    if not params:
        return
    n = len(params)
    device = params[0].device
    check_call("Adagrad", n, {"grads": grads, "state_sums": state_sums, "state_steps": state_steps}, device, hist)
    with torch.no_grad():
        steps_on_host = all(s.device.type == "cpu" for s in state_steps)
        if found_inf is not None:
            if steps_on_host and found_inf.device.type != "cpu":
                # host step counts cannot be rolled back on the device: read the flag (a sync)
                if float(found_inf.item()) != 0.0:
                    return
                found_inf = None
            else:
                found_inf = found_inf.to(device=device, non_blocking=True).reshape(())
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=device, non_blocking=True).reshape(())
        torch._foreach_add_(state_steps, 1)
        neg_clr = _neg_clr(state_steps, device, lr, float(lr_decay))
        plan = plan_groups("Adagrad", device, [params, grads, state_sums])
        launch(
            _adagrad_hist_kernel,
            plan,
            hist,
            lambda tables, scratch: (
                tables.table,
                tables.chunks,
                scratch,
                neg_clr,
                grad_scale if grad_scale is not None else neg_clr,
                found_inf if found_inf is not None else neg_clr,
                float(eps),
                float(weight_decay),
            ),
            {
                "MAXIMIZE": bool(maximize),
                "HAS_WD": weight_decay != 0,
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
