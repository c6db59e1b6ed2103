"""Reference accumulation of per-tensor histograms of √v̂ (or any nonnegative quantity).

For tensor ``i`` of a call with per-tensor scale ``c_i``::

    x = float32(sqrt_rn(float32(v_i))) / float32(c_i)      # IEEE division, round to nearest
    bin = LogBins layout of bits(|x|)                       # see fasthist.bins

``delta[i]`` counts tensor ``i``'s bins; then ``step[rows[i]] = delta[i]`` and
``total[rows[i]] += delta[i]`` unless the step was skipped (``found_inf`` nonzero), in
which case both windows stay as they were. No value leaves the device and nothing
synchronises the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..bins import LogBins

__all__ = ["HistTarget", "sqrt_scaled_", "accumulate_"]


@dataclass
class HistTarget:
    """Where one backend call writes its histograms: rows of packed [R, num_bins] buffers.

    ``rows[i]`` is the row of the i-th tensor of the call; ``step``/``total`` are the
    "step" and "total" windows. All on one device.
    """

    bins: LogBins
    step: Tensor
    total: Tensor
    rows: Tensor
    _workspace: dict = field(default_factory=dict, repr=False)

    def workspace(self, sizes: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(values fp32, keys int32, zero mask, per-element row offset) for these sizes,
        kept while the sizes are unchanged: big CPU allocations page-fault every step."""
        ws = self._workspace.get(sizes)
        if ws is None:
            self._workspace.clear()
            device, n, nb = self.step.device, sum(sizes), self.bins.num_bins
            offsets = torch.arange(len(sizes), device=device, dtype=torch.int64) * nb
            seg = torch.repeat_interleave(offsets, torch.tensor(sizes, device=device, dtype=torch.int64))
            key_dtype = torch.int32 if len(sizes) * nb < 2**31 else torch.int64
            ws = (
                torch.empty(n, device=device, dtype=torch.float32),
                torch.empty(n, device=device, dtype=key_dtype),
                torch.empty(n, device=device, dtype=torch.bool),
                seg.to(key_dtype),
            )
            self._workspace[sizes] = ws
        return ws


def sqrt_scaled_(flat: Tensor, sizes: tuple[int, ...], scale: list[float] | Tensor) -> None:
    """In place on the concatenated values: ``flat = sqrt(flat) / scale[i]`` per segment."""
    flat.sqrt_()
    parts = list(flat.split(sizes))
    if isinstance(scale, Tensor):
        torch._foreach_div_(parts, list(scale.to(torch.float32).unbind()))
    else:
        torch._foreach_div_(parts, scale)


def accumulate_(
    target: HistTarget,
    values: list[Tensor],
    scale: list[float] | Tensor,
    found_inf: Tensor | None = None,
) -> None:
    """Histogram ``sqrt(values[i]) / scale[i]`` of every tensor into its row of ``target``.

    ``scale`` is a list of floats (host) or a float tensor of ``len(values)`` on the device.
    """
    device = target.step.device
    for v in values:
        if v.device != device:
            raise RuntimeError(
                f"fasthist: all tensors of one backend call must be on {device}, but got one on {v.device}"
            )
    bins = target.bins
    flat_views = [torch.view_as_real(v).reshape(-1) if v.is_complex() else v.reshape(-1) for v in values]
    sizes = tuple(v.numel() for v in flat_views)
    flat, keys, zero, seg = target.workspace(sizes)
    if flat_views:
        torch.cat(flat_views, out=flat)
    sqrt_scaled_(flat, sizes, scale)
    bits = flat.view(torch.int32).bitwise_and_(0x7FFFFFFF)
    torch.eq(bits, 0, out=zero)
    bits.bitwise_right_shift_(bins.shift)
    torch.index_select(bins.key_table_on(device).to(keys.dtype), 0, bits, out=keys)
    keys.masked_fill_(zero, bins.ZERO).add_(seg)
    delta = torch.bincount(keys, minlength=len(sizes) * bins.num_bins).view(len(sizes), bins.num_bins)
    rows = target.rows
    if found_inf is None:
        target.step.index_copy_(0, rows, delta)
        target.total.index_add_(0, rows, delta)
    else:
        skipped = found_inf.to(device=device, dtype=torch.bool).reshape(())
        target.step.index_copy_(0, rows, torch.where(skipped, target.step.index_select(0, rows), delta))
        target.total.index_add_(0, rows, delta.masked_fill(skipped, 0))
