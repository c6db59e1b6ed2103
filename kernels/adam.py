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
    hist  += LogBins index of x                     # per program, tl.histogram

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

Launches per call: one main launch per parameter dtype (a table of tensor pointers and chunk
descriptors, cached while the tensors are unchanged; one program per chunk of ``CHUNK``
elements of one tensor, histogram flushed once per program with atomics on non-zero bins
only), one finalize launch for the histogram windows (:mod:`fasthist.kernels._common`), and
the few ``torch`` ops that increment the step counts (and compute the bias corrections on the
device when capturable). ``grad_scale``/``found_inf`` follow torch's fused Adam: grads are
unscaled in place, and ``found_inf`` nonzero masks every load and store on the device, so
parameters, states, step counts and histograms stay untouched without a host sync (with step
counts on the CPU and ``found_inf`` on the GPU the flag is read on the host instead).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.reference.adam import adam_reference, bias_correction2_sqrt
from fasthist.reference.histogram import HistTarget

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

__all__ = ["adam_hist", "configure", "BLOCK", "ITERS", "CHUNK", "NUM_WARPS"]

# Launch shape (untuned: no GPU was available when it was chosen; see configure()).
BLOCK = 1024  # elements per inner iteration (one tl.histogram call)
ITERS = 4  # inner iterations per program
CHUNK = BLOCK * ITERS  # elements per program: each program touches one tensor
NUM_WARPS = 4
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_NO_BINS = {"SHIFT": 0, "LOW_KEY": 0, "ABOVE": 1, "NONFINITE": 1, "NUM_BINS": 1, "HIST_BINS": 1}


@triton.jit
def _ptrs(base, offs, ALIGNED: tl.constexpr):
    """Pointers of one block; ALIGNED: the block starts 16-byte aligned (vector access)."""
    ptrs = base + offs
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, 16)
    return ptrs


@triton.jit
def _ld(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def _st(ptrs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@triton.jit
def _adam_chunk(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    numel,
    neg_step_size,
    c,
    decay,
    grad_scale,
    one_minus_beta1,
    lerp_coeff,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    MASKED: tl.constexpr,  # False: the chunk is full, no masks (vector loads and stores)
    ALIGNED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WD_MODE: tl.constexpr,
    LERP_SMALL: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    TRACK: tl.constexpr,
    SHIFT: tl.constexpr,
    LOW_KEY: tl.constexpr,
    ABOVE: tl.constexpr,
    NONFINITE: tl.constexpr,
    HIST_BINS: tl.constexpr,
):
    """The update of one chunk (``ITERS`` blocks of one tensor); returns its histogram."""
    acc = tl.zeros([HIST_BINS], dtype=tl.int32)
    for it in range(ITERS):
        offs = it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        gp = _ptrs(g_ptr, offs, ALIGNED)
        g = _ld(gp, mask, MASKED)
        if HAS_GRAD_SCALE:
            g = tl.div_rn(g, grad_scale)
            _st(gp, g.to(DTYPE), mask, MASKED)
        if MAXIMIZE:
            g = -g
        pp = _ptrs(p_ptr, offs, ALIGNED)
        p = _ld(pp, mask, MASKED)
        if WD_MODE == 1:
            g = tl.fma(p, weight_decay, g)
        if WD_MODE == 2:
            p = p * decay
        mp = _ptrs(m_ptr, offs, ALIGNED)
        m = _ld(mp, mask, MASKED)
        if LERP_SMALL:
            m = tl.fma(one_minus_beta1, g - m, m)
        else:
            m = tl.fma(lerp_coeff, g - m, g)
        m = m.to(DTYPE)
        _st(mp, m, mask, MASKED)
        vp = _ptrs(v_ptr, offs, ALIGNED)
        v = _ld(vp, mask, MASKED)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2).to(DTYPE)
        _st(vp, v, mask, MASKED)
        v_den = v.to(tl.float32)
        if AMSGRAD:
            xp = _ptrs(vmax_ptr, offs, ALIGNED)
            v_den = tl.maximum(_ld(xp, mask, MASKED), v_den, propagate_nan=tl.PropagateNan.ALL)
            _st(xp, v_den.to(DTYPE), mask, MASKED)
        x = tl.div_rn(tl.sqrt_rn(v_den), c)
        p = p + tl.div_rn(neg_step_size * m.to(tl.float32), x + eps)
        _st(pp, p.to(DTYPE), mask, MASKED)
        if TRACK:
            idx = bin_index(x, SHIFT, LOW_KEY, ABOVE, NONFINITE)
            if MASKED:
                acc += tl.histogram(idx, HIST_BINS, mask=mask)
            else:
                acc += tl.histogram(idx, HIST_BINS)
    return acc


@triton.jit
def _adam_hist_kernel(
    table_ptr,  # int64 [n, 7]: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, numel, slot
    chunk_ptr,  # int64 [num_chunks, 2]: table row, first element
    coef_ptr,  # float32 [num_slots, 3]: -step_size, c = sqrt(1 - beta2**step), 1 - lr*wd
    scratch_ptr,  # int64 [num_slots, NUM_BINS]
    grad_scale_ptr,
    found_inf_ptr,
    one_minus_beta1,  # float32(1 - beta1): the lerp weight
    lerp_coeff,  # weight, or weight - 1 when interpolating from the end (w >= 0.5)
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor of the launch starts 16-byte aligned
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WD_MODE: tl.constexpr,  # 0 none, 1 coupled (Adam), 2 decoupled (AdamW)
    LERP_SMALL: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
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
    # pointers advanced to the chunk once (64-bit), then 32-bit offsets inside the chunk
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE)) + start
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE)) + start
    m_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE)) + start
    v_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE)) + start
    vmax_ptr = tl.load(row + 4).to(tl.pointer_type(DTYPE)) + start  # a copy of v's without amsgrad
    numel = tl.minimum(tl.load(row + 5) - start, BLOCK * ITERS).to(tl.int32)  # live elements of this chunk
    slot = tl.load(row + 6)
    neg_step_size = tl.load(coef_ptr + 3 * slot)
    c = tl.load(coef_ptr + 3 * slot + 1)
    decay = tl.load(coef_ptr + 3 * slot + 2)
    if HAS_FOUND_INF:  # a skipped step touches nothing: every element is masked off
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    args = (p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, numel, neg_step_size, c, decay, grad_scale)
    if numel == BLOCK * ITERS:  # a full chunk (most of them): no masks
        acc = _adam_chunk(
            *args, one_minus_beta1, lerp_coeff, beta2, one_minus_beta2, eps, weight_decay,
            DTYPE, BLOCK, ITERS, False, ALIGNED, AMSGRAD, MAXIMIZE, WD_MODE, LERP_SMALL, HAS_GRAD_SCALE,
            TRACK, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS,
        )  # fmt: skip
    else:
        acc = _adam_chunk(
            *args, one_minus_beta1, lerp_coeff, beta2, one_minus_beta2, eps, weight_decay,
            DTYPE, BLOCK, ITERS, True, ALIGNED, AMSGRAD, MAXIMIZE, WD_MODE, LERP_SMALL, HAS_GRAD_SCALE,
            TRACK, SHIFT, LOW_KEY, ABOVE, NONFINITE, HIST_BINS,
        )  # fmt: skip
    if TRACK:
        flush_histogram(acc, scratch_ptr + slot * NUM_BINS, NUM_BINS, HIST_BINS)


def _launch(
    device: torch.device,
    dtype: torch.dtype,
    tables: TensorTable,
    coef: Tensor,
    scratch: Tensor | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    scalars: dict[str, float],
    flags: dict[str, Any],
    bin_kwargs: dict[str, int],
) -> None:
    if tables.num_chunks == 0:
        return
    dummy = coef
    _adam_hist_kernel[(tables.num_chunks,)](
        tables.table,
        tables.chunks,
        coef,
        scratch if scratch is not None else dummy,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        scalars["one_minus_beta1"],
        scalars["lerp_coeff"],
        scalars["beta2"],
        scalars["one_minus_beta2"],
        scalars["eps"],
        scalars["weight_decay"],
        DTYPE=tl_dtype(dtype),
        BLOCK=BLOCK,
        ITERS=ITERS,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        TRACK=scratch is not None,
        num_warps=NUM_WARPS,
        **flags,
        **bin_kwargs,
        **launch_options(device),
    )


def configure(block: int = 1024, iters: int = 4, num_warps: int = 4) -> None:
    """Set the launch shape of the Adam kernel: ``block`` elements per ``tl.histogram``
    call (a power of two), ``iters`` blocks per program, ``num_warps`` per program. For
    tuning on a GPU (``bench/gpu_report.py --sweep``); results do not depend on it."""
    global BLOCK, ITERS, CHUNK, NUM_WARPS
    for name, value in (("block", block), ("iters", iters), ("num_warps", num_warps)):
        if not isinstance(value, int) or value < 1 or (name != "iters" and value & (value - 1)):
            raise ValueError(f"Invalid {name}: {value}; expected a positive int (a power of two for block, num_warps)")
    BLOCK, ITERS, CHUNK, NUM_WARPS = block, iters, block * iters, num_warps
    _PLANS.clear()  # their tables were cut in chunks of the old size


def _scalar(x: float | Tensor, name: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise RuntimeError(
                f"fasthist Adam: {name} must be a float or a one-element Tensor, but got shape {tuple(x.shape)}"
            )
        return float(x.item())
    return float(x)


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
        lr_f = _scalar(lr, "lr") if not on_device else 0.0
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


class _Plan:
    """What a call needs beyond the per-step scalars: per dtype the launch tables, and the
    (originals, contiguous copies) of tensors a flat walk cannot handle in place."""

    __slots__ = ("groups", "write_back")

    def __init__(self, groups: list[tuple[torch.dtype, TensorTable, bool]], write_back: list) -> None:
        self.groups = groups
        self.write_back = write_back


# Plans by (device, amsgrad, param ids, data_ptrs of every list): a step whose tensors did
# not move (the usual case, also under CUDA-graph replay) skips all per-tensor Python work.
_PLANS: OrderedDict = OrderedDict()


def _plan(
    device: torch.device,
    n: int,
    amsgrad: bool,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
) -> _Plan:
    groups: dict[torch.dtype, tuple[list[list[Tensor]], list[int], list[int]]] = {}
    write_back: list[tuple[list[Tensor], list[Tensor]]] = []
    for i in range(n):
        p, g = params[i], grads[i]
        if g.dtype != p.dtype or g.device != p.device:
            raise TypeError(
                f"fasthist Adam: grad {i} must match its parameter's dtype and device ({p.dtype}, {p.device}), "
                f"but got {g.dtype} on {g.device}"
            )
        ts = [p, g, exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if amsgrad else [])
        if p.is_complex():
            ts = [torch.view_as_real(t) for t in ts]
        for t in ts[2:]:
            if t.dtype != ts[0].dtype or t.device != device or t.shape != ts[0].shape:
                raise TypeError(
                    f"fasthist Adam: the state of parameter {i} must be {ts[0].dtype} of shape "
                    f"{tuple(ts[0].shape)} on {device}, but got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
        work, copied = dense_views(ts)
        if copied:
            write_back.append((ts, work))
        if not amsgrad:
            work.append(work[3])  # unused column: any valid pointer
        cols, numels, slots = groups.setdefault(ts[0].dtype, ([[] for _ in range(5)], [], []))
        for col, t in zip(cols, work, strict=True):
            col.append(t)
        numels.append(work[0].numel())
        slots.append(i)
    tables = [
        (
            dt,
            TensorTable.get(device, cols, numels, slots, CHUNK),
            all(t.data_ptr() % 16 == 0 for col in cols for t in col),
        )
        for dt, (cols, numels, slots) in groups.items()
    ]
    return _Plan(tables, write_back)


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

    ``differentiable=True`` (autograd through the step) and float64 parameters run on the
    reference backend; ``foreach`` and ``fused`` are accepted and ignored (the kernel is
    always multi-tensor and fused).
    """
    if not params:
        return
    kwargs = dict(
        amsgrad=amsgrad,
        has_complex=has_complex,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        foreach=foreach,
        capturable=capturable,
        differentiable=differentiable,
        fused=fused,
        grad_scale=grad_scale,
        found_inf=found_inf,
        decoupled_weight_decay=decoupled_weight_decay,
    )
    if not differentiable:
        with torch.no_grad():
            done = _adam_hist(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                state_steps,
                hist=hist,
                amsgrad=amsgrad,
                beta1=_scalar(beta1, "beta1"),
                beta2=_scalar(beta2, "beta2"),
                lr=lr,
                weight_decay=float(weight_decay),
                eps=float(eps),
                maximize=maximize,
                capturable=capturable,
                grad_scale=grad_scale,
                found_inf=found_inf,
                decoupled=decoupled_weight_decay,
            )
        if done:
            return
    # autograd through the step, or float64/complex128 parameters: the reference backend
    adam_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, hist=hist, **kwargs)


def _adam_hist(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: HistTarget | None,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    capturable: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    decoupled: bool,
) -> bool:
    """The fused step; False (having touched nothing) when a dtype needs the reference."""
    device = params[0].device
    n = len(params)
    for name, lst in (
        ("grads", grads),
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("state_steps", state_steps),
    ):
        if len(lst) != n:
            raise RuntimeError(f"fasthist Adam: expected {n} {name}, but got {len(lst)}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise RuntimeError(f"fasthist Adam: amsgrad=True needs {n} max_exp_avg_sqs, but got {len(max_exp_avg_sqs)}")
    if hist is not None and hist.step.device != device:
        raise RuntimeError(f"fasthist Adam: histograms on {hist.step.device}, but parameters on {device}")

    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else exp_avg_sqs)
    key = (device, amsgrad, tuple(map(id, params)), *(tuple(map(Tensor.data_ptr, lst)) for lst in lists))
    plan = _PLANS.get(key)
    if plan is None:
        if any(p.dtype not in _SUPPORTED and p.dtype != torch.complex64 for p in params):
            return False
        plan = _plan(device, n, amsgrad, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
        if not plan.write_back:  # copies move every step: nothing to reuse
            _PLANS[key] = plan
            if len(_PLANS) > 64:  # one per param group and device, usually
                _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)

    # Step counts: on the host (torch's default) or on the device (capturable/fused).
    on_device = capturable or state_steps[0].device.type != "cpu"
    if found_inf is not None:
        if not on_device and found_inf.device.type != "cpu":
            # Host step counts cannot be rolled back on the device: read the flag (a sync,
            # only for this unusual combination; torch's GradScaler syncs here too).
            if float(found_inf.item()) != 0.0:
                return True
            found_inf = None
        else:
            found_inf = found_inf.to(device=device, non_blocking=True).reshape(())
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=device, non_blocking=True).reshape(())
    torch._foreach_add_(state_steps, 1)
    coef = _coefficients(state_steps, device, on_device, lr, beta1, beta2, weight_decay, decoupled)

    scratch = scratch_for(hist, n) if hist is not None else None
    bin_kwargs = BinSpec(hist.bins).kwargs() if hist is not None else _NO_BINS
    w = np.float32(1 - beta1)
    lerp_small = bool(abs(w) < 0.5)
    scalars = {
        "one_minus_beta1": float(w),
        "lerp_coeff": float(w if lerp_small else w - np.float32(1)),
        "beta2": beta2,
        "one_minus_beta2": 1 - beta2,
        "eps": eps,
        "weight_decay": weight_decay,
    }
    wd_mode = 0 if weight_decay == 0 else (2 if decoupled else 1)
    flags = {"AMSGRAD": bool(amsgrad), "MAXIMIZE": bool(maximize), "WD_MODE": wd_mode, "LERP_SMALL": lerp_small}
    for dtype, tables, aligned in plan.groups:
        _launch(
            device,
            dtype,
            tables,
            coef,
            scratch,
            grad_scale,
            found_inf,
            scalars,
            dict(flags, ALIGNED=aligned),
            bin_kwargs,
        )
    if hist is not None:
        finalize_histograms(hist, scratch, found_inf)
    for originals, work in plan.write_back:
        for k, (orig, tmp) in enumerate(zip(originals, work, strict=False)):
            if k == 1 and grad_scale is None:
                continue  # the grad is only written when it is unscaled
            orig.copy_(tmp)
    if found_inf is not None:
        flag = found_inf.to(state_steps[0].device)
        torch._foreach_sub_(state_steps, [flag] * n)
    return True
