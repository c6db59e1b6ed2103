"""Reference accumulation of per-tensor histograms of √v̂ (or any nonnegative quantity).

For tensor ``i`` of a call with per-tensor scale ``c_i``::

    x = float32(sqrt_rn(float32(v_i))) / float32(c_i)      # IEEE division, round to nearest
    bin = LogBins layout of bits(|x|)                       # see fasthist.bins

(``sqrt=False`` bins ``float32(v_i) / float32(c_i)`` instead.) An element with ``v == 0``
is counted as zero; one whose quotient underflows to 0 (``sqrt=False`` divides by
``c >= 1``) is not zero, and is counted below range. float64 (and complex128) tensors are
computed in float64, ``x = sqrt_rn(v_i) / c_i``, and binned from their own bits
(:meth:`LogBins.index`): a cast to float32 would turn tiny values into zeros and huge
ones into infinities. Fast path: with the square
root and host scales ``0 < c_i <= 1``, ``x`` is either 0 or at least
``sqrt_rn(2**-149) ~ 3.7e-23``, a normal float, so the shifted key 0 can only hold exact
zeros and the zero test costs nothing.

``delta[i]`` counts tensor ``i``'s bins; then ``step[rows[i]] = delta[i]`` and
``total[rows[i]] += delta[i]`` unless the step was skipped (``found_inf`` nonzero), in
which case both windows stay as they were. No value leaves the device and nothing
synchronises the host.

Pure torch ops: this is the oracle the other backends are tested against. (The dispatcher,
:mod:`fasthist.dispatch`, runs the compiled CPU pass of :mod:`fasthist.csrc` instead where it
takes the call: the same bins, exactly, in one sweep.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..declaration import HistInputs
from ..dtensor import local_tensor
from ..target import HistTarget

# HistTarget lives in fasthist.target; it is re-exported here, where it used to be
__all__ = ["HistTarget", "accumulate_", "binned_values", "record_"]
_KEY = "fasthist.reference.workspace"


def _workspace(target: HistTarget, sizes: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(values fp32, keys int32, zero mask, per-element row offset) for these sizes, kept in
    the target (big CPU allocations page-fault every step)."""
    device, n, nb = target.step.device, sum(sizes), target.bins.num_bins
    key_dtype = torch.int32 if len(sizes) * nb < 2**31 else torch.int64

    def row_offsets() -> Tensor:
        offsets = torch.arange(len(sizes), device=device, dtype=torch.int64) * nb
        repeats = torch.tensor(sizes, dtype=torch.int64).to(device, non_blocking=True)
        seg = torch.repeat_interleave(offsets, repeats, output_size=n)  # output_size: no device read
        return seg.to(key_dtype)

    return (
        target.buffer((_KEY, "values", sizes), lambda: torch.empty(n, device=device, dtype=torch.float32)),
        target.buffer((_KEY, "keys", sizes), lambda: torch.empty(n, device=device, dtype=key_dtype)),
        target.buffer((_KEY, "zero", sizes), lambda: torch.empty(n, device=device, dtype=torch.bool)),
        target.buffer((_KEY, "rows", sizes), row_offsets),
    )


def _sqrt_rn_(t: Tensor) -> None:
    """Correctly rounded sqrt in place. torch's CPU float32 sqrt (MKL VML) can be 1 ulp off
    round-to-nearest, and the bins must match the kernels' ``sqrt_rn`` exactly. Under
    ``torch.compile``, which traces numpy calls into torch ops, a float32 one goes through
    float64 (rounded once to float32: correctly rounded, as 53 >= 2*24 + 2 bits, even from a
    float64 sqrt 1 ulp off)."""
    if torch.compiler.is_compiling() and t.dtype == torch.float32:
        t.copy_(t.double().sqrt())
    elif t.device.type == "cpu":
        np.sqrt(t.numpy(), out=t.numpy())
    else:
        t.sqrt_()


def _values_into_(flat: Tensor, views: list[Tensor], sizes: tuple[int, ...], sqrt: bool) -> list[Tensor]:
    """``flat[segment i] = sqrt(views[i])`` (float32), one pass where possible; the segments."""
    parts = list(flat.split(sizes))
    compiling = torch.compiler.is_compiling()
    if sqrt and not compiling and len(views) <= 64 and all(v.dtype == torch.float32 for v in views):
        for v, part in zip(views, parts, strict=True):  # few big tensors: sqrt straight into place
            if v.device.type == "cpu":
                np.sqrt(v.detach().numpy(), out=part.numpy())
            else:
                torch.sqrt(v, out=part)
    else:
        if views:
            torch.cat(views, out=flat)
        if sqrt:
            _sqrt_rn_(flat)
    return parts


def _divide_(parts: list[Tensor], scale, reciprocal: bool = False) -> None:
    """``parts[i] /= scale[i]`` (``*=`` with ``reciprocal``), in float32."""
    op = torch._foreach_mul_ if reciprocal else torch._foreach_div_
    if isinstance(scale, Tensor):
        op(parts, list(scale.to(torch.float32).unbind()))
    elif any(c != 1.0 for c in scale):
        op(parts, scale)


def _narrow_counts(target: HistTarget, views: list[Tensor], scale, sqrt: bool, reciprocal: bool = False) -> Tensor:
    """[len(views), num_bins] counts of float32 (or narrower) ``views``, binned in float32."""
    device, bins = target.step.device, target.bins
    sizes = tuple(v.numel() for v in views)
    flat, keys, zero, seg = _workspace(target, sizes)
    parts = _values_into_(flat, views, sizes, sqrt)
    # sqrt(v) >= 3.7e-23 for v > 0: divided by c <= 1 (multiplied by c >= 1) it cannot underflow
    key0_is_zero = (
        sqrt and not isinstance(scale, Tensor) and all((c >= 1.0) if reciprocal else (0.0 < c <= 1.0) for c in scale)
    )
    if not key0_is_zero:  # zero before the division: a quotient that underflows is below range
        torch.eq(flat, 0, out=zero)
    _divide_(parts, scale, reciprocal)
    bits = flat.view(torch.int32).bitwise_and_(0x7FFFFFFF)
    bits.bitwise_right_shift_(bins.shift)
    table = bins.key_table_on(device, key0_is_zero=key0_is_zero)
    torch.index_select(table if keys.dtype == torch.int32 else table.long(), 0, bits, out=keys)
    if not key0_is_zero:
        keys.masked_fill_(zero, bins.ZERO)
    keys.add_(seg)
    nbins = len(sizes) * bins.num_bins
    if device.type == "cpu":
        delta = torch.bincount(keys, minlength=nbins)
    else:  # CUDA's bincount reads min/max back to the host; a scatter-add does not
        delta = torch.zeros(nbins, dtype=torch.int64, device=device)
        delta.index_add_(0, keys, torch.ones((), dtype=torch.int64, device=device).expand(keys.numel()))
    return delta.view(len(sizes), bins.num_bins)


def _wide_counts(target: HistTarget, views: list[Tensor], scale, sqrt: bool, reciprocal: bool = False) -> Tensor:
    """[len(views), num_bins] counts of float64 ``views``, computed and binned in float64."""
    rows = []
    for i, v in enumerate(views):
        x = v.detach().clone()
        if sqrt:
            _sqrt_rn_(x)
        c = scale[i].to(torch.float64) if isinstance(scale, Tensor) else scale[i]
        zero = x == 0
        x = x * c if reciprocal else x / c
        x[zero] = 0.0  # zero before the division, as for float32: an underflow is below range
        x[(x == 0) & ~zero] = torch.finfo(torch.float64).tiny * 0.5  # any subnormal: below range
        rows.append(target.bins.count(x))
    return torch.stack(rows)


def _flat_views(values: list[Tensor], device: torch.device) -> list[Tensor]:
    """Each tensor's local, flattened real view (complex as (re, im) pairs), all on ``device``."""
    if any(type(v) is not Tensor for v in values):  # DTensors (and other subclasses): one pass more
        values = [local_tensor(v) for v in values]
    if not all(v.device == device for v in values):
        bad = next(v.device for v in values if v.device != device)
        raise RuntimeError(f"fasthist: all tensors of one backend call must be on {device}, but got one on {bad}")
    return [torch.view_as_real(v).reshape(-1) if v.is_complex() else v.reshape(-1) for v in values]


def _sub_scale(scale: list[float] | Tensor, idx: list[int]) -> list[float] | Tensor:
    """The scales of the tensors ``idx`` of a call."""
    if isinstance(scale, Tensor):
        return scale[torch.tensor(idx, device=scale.device)]
    return [scale[i] for i in idx]


def binned_values(
    target: HistTarget,
    values: list[Tensor],
    scale: list[float] | Tensor,
    *,
    sqrt: bool = True,
    reciprocal: bool = False,
) -> list[Tensor]:
    """The value :func:`accumulate_` bins for each element of ``values`` (module docstring:
    ``sqrt(values[i]) / scale[i]``, or as ``sqrt``/``reciprocal`` say), each tensor's
    flattened (complex as (re, im) pairs): float32, in the target's workspace (the next
    :func:`accumulate_` of the same sizes overwrites it), or float64 for float64 tensors."""
    device = target.step.device
    flat_views = _flat_views(values, device)
    if isinstance(scale, Tensor):
        scale = scale.to(device)
    out: list[Tensor] = list(flat_views)
    narrow = [i for i, v in enumerate(flat_views) if v.dtype != torch.float64]
    if narrow:
        sizes = tuple(flat_views[i].numel() for i in narrow)
        if torch.compiler.is_compiling():  # no workspace first made in a trace: a recompilation
            flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        else:
            flat = _workspace(target, sizes)[0]
        parts = _values_into_(flat, [flat_views[i] for i in narrow], sizes, sqrt)
        _divide_(parts, _sub_scale(scale, narrow), reciprocal)
        for i, part in zip(narrow, parts, strict=True):
            out[i] = part
    for i, v in enumerate(flat_views):
        if v.dtype == torch.float64:
            x = v.detach().clone()
            if sqrt:
                _sqrt_rn_(x)
            c = scale[i].to(torch.float64) if isinstance(scale, Tensor) else scale[i]
            out[i] = x * c if reciprocal else x / c
    return out


def accumulate_(
    target: HistTarget,
    values: list[Tensor],
    scale: list[float] | Tensor,
    found_inf: Tensor | None = None,
    *,
    sqrt: bool = True,
    reciprocal: bool = False,
) -> None:
    """Histogram ``sqrt(values[i]) / scale[i]`` of every tensor into its row of ``target``
    (``sqrt(values[i]) * scale[i]`` with ``reciprocal``: one IEEE multiply, no division).

    ``scale`` is a list of floats (host) or a float tensor of ``len(values)`` on the device.
    A DTensor is histogrammed by its local shard (merged across ranks by
    :mod:`fasthist.distributed`). float64 values (and complex128) are computed and binned
    in float64; a nonzero value whose quotient underflows is counted below range.
    """
    device = target.step.device
    flat_views = _flat_views(values, device)
    if isinstance(scale, Tensor):
        scale = scale.to(device)
    wide = [i for i, v in enumerate(flat_views) if v.dtype == torch.float64]
    if not wide:
        delta = _narrow_counts(target, flat_views, scale, sqrt, reciprocal)
    else:
        narrow = [i for i in range(len(flat_views)) if flat_views[i].dtype != torch.float64]
        delta = torch.empty(len(flat_views), target.bins.num_bins, dtype=torch.int64, device=device)
        for idx, counts in ((narrow, _narrow_counts), (wide, _wide_counts)):
            if idx:
                sub_scale = _sub_scale(scale, idx)
                delta[idx] = counts(target, [flat_views[i] for i in idx], sub_scale, sqrt, reciprocal)
    rows = target.rows
    if found_inf is None:
        target.step.index_copy_(0, rows, delta)
        target.total.index_add_(0, rows, delta)
    else:
        skipped = found_inf.to(device=device, dtype=torch.bool).reshape(())
        target.step.index_copy_(0, rows, torch.where(skipped, target.step.index_select(0, rows), delta))
        target.total.index_add_(0, rows, delta.masked_fill(skipped, 0))


def record_(
    hist: HistTarget | None,
    hist_inputs: Callable[[list[list[Tensor]], dict[str, Any]], HistInputs],
    lists: list[list[Tensor]],
    kwargs: dict[str, Any],
    *,
    sqrt: bool = True,
    reciprocal: bool = False,
    accumulate: Callable[..., Any] = accumulate_,
) -> None:
    """The histogram pass of one functional call after its update: bins what
    ``hist_inputs(lists, kwargs)`` returns (``values, scale, found_inf``) into ``hist`` with
    ``accumulate`` (these torch ops by default); nothing when ``hist`` is None."""
    if hist is None:
        return
    with torch.no_grad():
        values, scale, found_inf = hist_inputs(lists, kwargs)
        accumulate(hist, values, scale, found_inf, sqrt=sqrt, reciprocal=reciprocal)
