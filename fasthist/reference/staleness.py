"""Reference pass of the second tracked quantity, the staleness of the second moment
(:mod:`fasthist.health`), around an optimizer's torch update. Per tensor::

    before the update:
    a  = |g|, widened to float32 (float64 for float64 tensors)   # g: decl.entering_grads
    after it:
    x  = the value the √v̂ histogram bins                          # fasthist.reference.histogram
    s  = a / max(x, float32(eps))                                 # IEEE float32 division, round to nearest
    hist.staleness += bins of s                                    # sqrt=False, scale 1: exact

``g`` is the gradient as it enters the second moment, read before the update changes the
parameters (coupled weight decay reads them) or the gradients (torch's fused step writes the
unscaled gradient back). ``x`` is recomputed from the stored state exactly as the √v̂ pass
bins it, so ``s`` divides by the very value of that histogram (with AMSGrad the maximum).
float64 tensors are computed in float64 throughout. Complex tensors are (re, im) pairs, as
in the √v̂ histogram. ``eps = 0`` is allowed: ``max(x, 0) = x``, and ``a / 0`` is counted in
the above-range (``a > 0``) or non-finite (``a = 0``) bin, as every element is counted
somewhere. A step skipped by ``found_inf`` leaves the staleness windows as they were, as it
does the √v̂ ones.

Workspace (kept in the target, allocated at the first step of a set of sizes): one float32
(or float64) value per element for ``a``, and the √v̂ pass's float32 value buffer for ``x``.
The gradient itself allocates a temporary per tensor only where torch computes a new one
(``maximize``, coupled weight decay, the fused step's unscaling).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..declaration import OptimizerDecl
from ..dtensor import local_tensor
from ..target import HistTarget
from .histogram import accumulate_, binned_values

__all__ = ["bin_staleness_", "coupled_entering_grads", "magnitudes_", "record_staleness_", "staleness_target"]

_KEY = "fasthist.reference.staleness"


def staleness_target(hist: HistTarget) -> HistTarget:
    """A target writing ``hist.staleness`` at ``hist.rows`` with ``hist.bins``, for a backend
    that bins one quantity per target (kept in ``hist.marks``: its own marks, so a backend's
    record of one quantity's rows is never taken for the other's; the workspace is shared)."""
    assert hist.staleness is not None
    if torch.compiler.is_compiling():  # a new one: a compiled step must not write the marks (a recompile)
        return HistTarget(hist.bins, *hist.staleness, hist.rows)
    found = hist.marks.get(_KEY)
    if found is None or found.step is not hist.staleness[0] or found.rows is not hist.rows:
        step, total = hist.staleness
        found = hist.marks[_KEY] = HistTarget(hist.bins, step, total, hist.rows, _workspace=hist._workspace)
    return found


def coupled_entering_grads(lists: list[list[Tensor]], kwargs: dict[str, Any]) -> list[Tensor]:
    """The gradient as torch's single-tensor and foreach forms feed it to
    the second moment: ``-grad`` under ``maximize``, then ``.add(param, alpha=weight_decay)``
    (coupled decay, none with ``decoupled_weight_decay``), with the op torch uses
    (``_foreach_add`` with ``foreach``), in the parameter's dtype. Read before the update."""
    params, grads = lists[0], lists[1]
    wd = 0.0 if kwargs.get("decoupled_weight_decay") else kwargs.get("weight_decay", 0.0)
    out = list(torch._foreach_neg(grads)) if kwargs.get("maximize") else list(grads)
    if wd != 0:
        if kwargs.get("foreach"):
            out = list(torch._foreach_add(out, params, alpha=wd))
        else:
            out = [g.add(p, alpha=wd) for g, p in zip(out, params, strict=True)]
    return out


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def magnitudes_(target: HistTarget, grads: list[Tensor]) -> list[Tensor]:
    """``|g|`` of each tensor, flattened (complex as (re, im)), widened to float32 (float64
    for float64 tensors), in the target's workspace (a new tensor in a compiled step, where
    a workspace first made in the trace would cost a recompilation)."""
    flats = []
    for g in grads:
        g = local_tensor(g) if type(g) is not Tensor else g
        flats.append((torch.view_as_real(g) if g.is_complex() else g).reshape(-1))
    out: list[Tensor] = list(flats)
    for dtype in (torch.float32, torch.float64):
        idx = [i for i, f in enumerate(flats) if _wide(f.dtype) == dtype]
        if not idx:
            continue
        sizes = tuple(flats[i].numel() for i in idx)
        make = functools.partial(torch.empty, sum(sizes), dtype=dtype, device=target.step.device)
        buf = make() if torch.compiler.is_compiling() else target.buffer((_KEY, "a", dtype, sizes), make)
        for i, part in zip(idx, buf.split(sizes), strict=True):
            part.copy_(flats[i].detach())
            out[i] = part.abs_()
    return out


def record_staleness_(
    hist: HistTarget | None,
    decl: OptimizerDecl,
    lists: list[list[Tensor]],
    kwargs: dict[str, Any],
    update: Callable[[], None],
    accumulate: Callable[..., Any] = accumulate_,
) -> None:
    """Run ``update()`` (the optimizer's torch update and its √v̂ histogram pass) with the
    staleness pass around it (module docstring) when ``hist.staleness`` is set; binned with
    ``accumulate`` (these torch ops by default, or the compiled CPU pass)."""
    if hist is None or hist.staleness is None:
        update()
        return
    assert decl.entering_grads is not None, f"{decl.name} tracks no staleness"
    target = staleness_target(hist)
    with torch.no_grad():
        mags = magnitudes_(target, decl.entering_grads(lists, kwargs))
    update()
    with torch.no_grad():
        bin_staleness_(target, decl, mags, lists, kwargs, accumulate)


def bin_staleness_(
    target: HistTarget,
    decl: OptimizerDecl,
    mags: list[Tensor],
    lists: list[list[Tensor]],
    kwargs: dict[str, Any],
    accumulate: Callable[..., Any] = accumulate_,
) -> None:
    """Bin ``s = mags / max(x, eps)`` into ``target`` (a :func:`staleness_target`), ``x`` the
    √v̂ values of the updated ``lists``; ``mags`` (|g|, :func:`magnitudes_`) is overwritten
    with ``s``. A step skipped by ``found_inf`` leaves the windows as they were."""
    values, scale, found_inf = decl.hist_inputs(lists, kwargs)
    xs = binned_values(target, values, scale, sqrt=decl.sqrt, reciprocal=decl.reciprocal)
    torch._foreach_clamp_min_(xs, kwargs["eps"])
    torch._foreach_div_(mags, xs)
    accumulate(target, mags, [1.0] * len(mags), found_inf, sqrt=False)
