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
is capturable when the step counts live on the device. Launches: one per dtype plus the histogram finalize launch
(:mod:`fasthist.kernels._common`).

:func:`plan_groups` (the multi-tensor tables for any column layout) is shared with
:mod:`.adagrad` and :mod:`.adabelief`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.reference.histogram import HistTarget
from fasthist.reference.rmsprop import rmsprop_reference

from ._common import (
    BinSpec,
    TensorTable,
    bin_index,
    dense_views,
    finalize_histograms,
    flush_histogram,
    launch_options,
    scratch_for,
    tl_dtype,
)

__all__ = ["rmsprop_hist", "plan_groups", "Plan", "lerp_coefficients", "scalar", "BLOCK", "ITERS", "CHUNK"]

BLOCK = 1024
ITERS = 4
CHUNK = BLOCK * ITERS
NUM_WARPS = 4
SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
NO_BINS = {"SHIFT": 0, "LOW_KEY": 0, "ABOVE": 1, "NONFINITE": 1, "NUM_BINS": 1, "HIST_BINS": 1}


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
    CENTERED: tl.constexpr,
    MOMENTUM: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    LERP_SMALL: tl.constexpr,
    LR_FROM_PTR: tl.constexpr,
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
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr)
    row = table_ptr + 7 * tid
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    numel = tl.load(row + 5)
    slot = tl.load(row + 6)
    if CENTERED:
        ga_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE))
    if MOMENTUM:
        buf_ptr = tl.load(row + 4).to(tl.pointer_type(DTYPE))
    acc = tl.zeros([HIST_BINS], dtype=tl.int32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_WD:
            g = tl.fma(p, weight_decay, g).to(DTYPE).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = (v * alpha).to(DTYPE).to(tl.float32)
        v = tl.fma(one_minus_alpha * g, g, v).to(DTYPE)
        tl.store(v_ptr + offs, v, mask=mask)
        d = v.to(tl.float32)
        if CENTERED:
            ga = tl.load(ga_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if LERP_SMALL:
                ga = tl.fma(lerp_w, g - ga, ga)
            else:
                ga = tl.fma(lerp_coeff, g - ga, g)
            ga = ga.to(DTYPE)
            tl.store(ga_ptr + offs, ga, mask=mask)
            gaf = ga.to(tl.float32)
            d = tl.fma(-gaf, gaf, d).to(DTYPE).to(tl.float32)
        x = tl.sqrt_rn(d)
        avg = (x.to(DTYPE).to(tl.float32) + eps).to(DTYPE).to(tl.float32)
        if MOMENTUM:
            buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            buf = (buf * momentum).to(DTYPE).to(tl.float32)
            buf = (buf + tl.div_rn(g, avg)).to(DTYPE)
            tl.store(buf_ptr + offs, buf, mask=mask)
            p = tl.fma(buf.to(tl.float32), -lr, p)
        else:
            p = p + tl.div_rn(-lr * g, avg)
        tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
        if TRACK:
            idx = bin_index(x, SHIFT, LOW_KEY, ABOVE, NONFINITE)
            acc += tl.histogram(idx, HIST_BINS, mask=mask)
    if TRACK:
        flush_histogram(acc, scratch_ptr + slot * NUM_BINS, NUM_BINS, HIST_BINS)


# -- host code shared by the kernels of the other optimizers ------------------------------
def scalar(x: float | Tensor, name: str, op: str) -> float:
    """A hyper-parameter as a Python float (a one-element tensor is read: a host sync)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise RuntimeError(f"fasthist {op}: {name} must be a float or a one-element Tensor, got {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def lerp_coefficients(weight: float) -> tuple[float, float, bool]:
    """``(w, coeff, small)`` for torch's CPU ``lerp(start, end, w)``: ``fma(w, end - start,
    start)`` when ``|w| < 0.5``, else ``fma(w - 1, end - start, end)``, with ``w`` in float32."""
    w = np.float32(weight)
    small = bool(abs(w) < 0.5)
    return float(w), float(w if small else w - np.float32(1)), small


class Plan:
    """Per dtype the launch tables, and the (originals, contiguous copies) of the tensor
    tuples a flat walk cannot handle in place (copied back after the launch)."""

    __slots__ = ("groups", "write_back")

    def __init__(self, groups: list[tuple[torch.dtype, TensorTable]], write_back: list) -> None:
        self.groups = groups
        self.write_back = write_back


_PLANS: OrderedDict = OrderedDict()


def plan_groups(op: str, device: torch.device, columns: Sequence[Sequence[Tensor | None]], chunk: int) -> Plan:
    """Tables for ``columns[k][i]`` (column 0 the parameters, 1 the grads; ``None`` for an
    unused column, which gets the parameter's pointer), cached on the tensors' ids and data
    pointers. Every tensor of a row must have the parameter's dtype, shape and device."""
    n = len(columns[0])
    key = (
        op,
        device,
        chunk,
        tuple(map(id, columns[0])),
        *(tuple(t.data_ptr() if t is not None else 0 for t in col) for col in columns),
    )
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    groups: dict[torch.dtype, tuple[list[list[Tensor]], list[int], list[int]]] = {}
    write_back: list[tuple[list[Tensor], list[Tensor]]] = []
    width = len(columns)
    for i in range(n):
        ts = [col[i] for col in columns]
        p = ts[0]
        assert p is not None
        if p.is_complex():
            ts = [torch.view_as_real(t) if t is not None else None for t in ts]
            p = ts[0]
        for k, t in enumerate(ts[1:], start=1):
            if t is not None and (t.dtype != p.dtype or t.device != device or t.shape != p.shape):
                what = "grad" if k == 1 else "state"
                raise TypeError(
                    f"fasthist {op}: the {what} of parameter {i} must be {p.dtype} of shape {tuple(p.shape)} on "
                    f"{device}, but got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        present = [t for t in ts if t is not None]
        work, copied = dense_views(present)
        if copied:
            write_back.append((present, work))
        it = iter(work)
        full = [next(it) if t is not None else None for t in ts]
        full = [t if t is not None else full[0] for t in full]
        cols, numels, slots = groups.setdefault(p.dtype, ([[] for _ in range(width)], [], []))
        for col, t in zip(cols, full, strict=True):
            col.append(t)
        numels.append(full[0].numel())
        slots.append(i)
    plan = Plan(
        [(dt, TensorTable.get(device, cols, numels, slots, chunk)) for dt, (cols, numels, slots) in groups.items()],
        write_back,
    )
    if not write_back:  # copies move every step: nothing to reuse
        _PLANS[key] = plan
        if len(_PLANS) > 32:
            _PLANS.popitem(last=False)
    return plan


def write_back(plan: Plan, grads_written: bool = False) -> None:
    """Copy the contiguous working copies back into the tensors they stand for (the grad,
    column 1, only when the kernel wrote it)."""
    for originals, work in plan.write_back:
        for k, (orig, tmp) in enumerate(zip(originals, work, strict=True)):
            if k == 1 and not grads_written:
                continue
            orig.copy_(tmp)


def unsupported(params: Sequence[Tensor]) -> bool:
    """Parameters the kernels do not handle (float64, complex128): the reference runs them."""
    return any(
        (p.is_complex() and p.dtype != torch.complex64) or (not p.is_complex() and p.dtype not in SUPPORTED)
        for p in params
    )


# -- RMSprop ------------------------------------------------------------------------------
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
    the histograms (module docstring). ``differentiable=True`` and float64 parameters run
    on the reference backend; ``foreach`` is accepted and ignored."""
    if not params:
        return
    if differentiable or unsupported(params):
        rmsprop_reference(
            params,
            grads,
            square_avgs,
            grad_avgs,
            momentum_buffer_list,
            state_steps,
            hist=hist,
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            capturable=capturable,
            has_complex=has_complex,
        )
        return
    n = len(params)
    device = params[0].device
    for name, lst, need in (
        ("grads", grads, True),
        ("square_avgs", square_avgs, True),
        ("grad_avgs", grad_avgs, centered),
        ("momentum_buffer_list", momentum_buffer_list, momentum > 0),
        ("state_steps", state_steps, True),
    ):
        if need and len(lst) != n:
            raise RuntimeError(f"fasthist RMSprop: expected {n} {name}, but got {len(lst)}")
    if hist is not None and hist.step.device != device:
        raise RuntimeError(f"fasthist RMSprop: histograms on {hist.step.device}, but parameters on {device}")
    with torch.no_grad():
        torch._foreach_add_(state_steps, 1)
        columns = [
            params,
            grads,
            square_avgs,
            grad_avgs if centered else [None] * n,
            momentum_buffer_list if momentum > 0 else [None] * n,
        ]
        plan = plan_groups("RMSprop", device, columns, CHUNK)
        scratch = scratch_for(hist, n) if hist is not None else None
        bin_kwargs = BinSpec(hist.bins).kwargs() if hist is not None else NO_BINS
        w, coeff, small = lerp_coefficients(1 - alpha)
        lr_t = None
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise RuntimeError(
                    f"fasthist RMSprop: lr must be a float or a one-element Tensor, got {tuple(lr.shape)}"
                )
            lr_t = lr.detach().to(device=device, dtype=torch.float32).reshape(1)
        lr_f = 0.0 if lr_t is not None else float(lr)
        for dtype, tables in plan.groups:
            if tables.num_chunks == 0:
                continue
            _rmsprop_hist_kernel[(tables.num_chunks,)](
                tables.table,
                tables.chunks,
                scratch if scratch is not None else tables.table,
                lr_t if lr_t is not None else tables.table,
                lr_f,
                float(alpha),
                1 - float(alpha),
                w,
                coeff,
                float(eps),
                float(weight_decay),
                float(momentum),
                DTYPE=tl_dtype(dtype),
                BLOCK=BLOCK,
                ITERS=ITERS,
                CENTERED=bool(centered),
                MOMENTUM=momentum > 0,
                MAXIMIZE=bool(maximize),
                HAS_WD=weight_decay != 0,
                LERP_SMALL=small,
                LR_FROM_PTR=lr_t is not None,
                TRACK=scratch is not None,
                num_warps=NUM_WARPS,
                **bin_kwargs,
                **launch_options(device),
            )
        if hist is not None:
            finalize_histograms(hist, scratch, None)
        write_back(plan)
