"""Pieces every fused optimizer-plus-histogram kernel shares.

- :func:`bin_index` (``@triton.jit``): the :class:`fasthist.LogBins` index of float32 values,
  read off their bits exactly as ``LogBins.index`` does (zero, below, log bins, above,
  non-finite), so Triton, the interpreter and PyTorch agree bit for bit.
- :func:`flush_histogram` (``@triton.jit``): add a program's register histogram (from
  ``tl.histogram``) into its tensor's row of the int64 scratch, one atomic per non-zero bin.
- :func:`finalize_histograms`: one launch per call that moves each tensor's scratch row into
  the ``step`` window (overwrite) and adds it to ``total``, then zeroes the scratch for the
  next step; with ``found_inf`` nonzero both windows stay untouched (device-side check, no
  host sync). The "total" window therefore costs no pass over the parameters.
- :class:`TensorTable`: the multi-tensor launch description (a table of ``data_ptr``s and
  sizes, one row per tensor, and a table of chunk descriptors ``(tensor, start)``, one per
  program), built once and cached while the pointers and sizes are unchanged.
- :func:`dense_views`: flat, dense views of a tensor and its companions (or contiguous
  copies to write back, for layouts a flat kernel cannot walk).

Scratch protocol: a call's scratch is ``int64 [num_tensors, num_bins]`` kept in the
:class:`~fasthist.reference.histogram.HistTarget` workspace, all zero between calls (the
finalize launch re-zeroes what the main launch added).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.bins import LogBins
from fasthist.reference.histogram import HistTarget

__all__ = [
    "BinSpec",
    "TensorTable",
    "bin_index",
    "dense_views",
    "finalize_histograms",
    "flush_histogram",
    "launch_options",
    "scratch_for",
    "tl_dtype",
]

_INF_BITS = 0x7F800000


# -- device code --------------------------------------------------------------------------
@triton.jit
def bin_index(x, SHIFT: tl.constexpr, LOW_KEY: tl.constexpr, ABOVE: tl.constexpr, NONFINITE: tl.constexpr):
    """LogBins index (int32) of float32 ``x``; see :mod:`fasthist.bins` for the layout."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    idx = (bits >> SHIFT) - LOW_KEY + 2
    idx = tl.minimum(tl.maximum(idx, 1), ABOVE)
    idx = tl.where(bits >= 0x7F800000, NONFINITE, idx)
    return tl.where(bits == 0, 0, idx)


@triton.jit
def flush_histogram(acc, row_ptr, NUM_BINS: tl.constexpr, HIST_BINS: tl.constexpr):
    """``row_ptr[b] += acc[b]`` for the non-zero bins (int64 row, ``acc`` from tl.histogram)."""
    b = tl.arange(0, HIST_BINS)
    tl.atomic_add(row_ptr + b, acc.to(tl.int64), mask=(acc != 0) & (b < NUM_BINS), sem="relaxed")


@triton.jit
def _finalize_kernel(
    scratch_ptr,
    rows_ptr,
    step_ptr,
    total_ptr,
    found_inf_ptr,
    NUM_BINS: tl.constexpr,
    FB: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    t = tl.program_id(0)
    b = tl.program_id(1) * FB + tl.arange(0, FB)
    in_row = b < NUM_BINS
    row = tl.load(rows_ptr + t)
    src = scratch_ptr + t.to(tl.int64) * NUM_BINS + b
    delta = tl.load(src, mask=in_row, other=0)
    live = NUM_BINS
    if HAS_FOUND_INF:  # skipped step: leave both windows as they are
        live = tl.where(tl.load(found_inf_ptr) == 0, NUM_BINS, 0)
    ok = b < live
    dst = row * NUM_BINS + b
    tl.store(step_ptr + dst, delta, mask=ok)
    total = tl.load(total_ptr + dst, mask=ok, other=0)
    tl.store(total_ptr + dst, total + delta, mask=ok)
    tl.store(src, tl.zeros_like(delta), mask=in_row)


# -- host code ----------------------------------------------------------------------------
class BinSpec:
    """The constexpr description of a LogBins layout for the kernels."""

    __slots__ = ("num_bins", "hist_bins", "shift", "low_key", "above", "nonfinite")

    def __init__(self, bins: LogBins) -> None:
        self.num_bins = bins.num_bins
        self.hist_bins = triton.next_power_of_2(bins.num_bins)  # tl.histogram needs a power of two
        self.shift = bins.shift
        self.low_key = bins.low_key
        self.above = bins.above
        self.nonfinite = bins.nonfinite

    def kwargs(self) -> dict[str, int]:
        return {
            "SHIFT": self.shift,
            "LOW_KEY": self.low_key,
            "ABOVE": self.above,
            "NONFINITE": self.nonfinite,
            "NUM_BINS": self.num_bins,
            "HIST_BINS": self.hist_bins,
        }


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"fasthist kernels support float32, bfloat16 and float16 tensors, but got {dtype}") from None


def launch_options(device: torch.device) -> dict:
    """No mul+add contraction on the GPU: the kernels write every FMA torch's CPU kernels
    use explicitly (``tl.fma``), so nothing else may be fused behind their back. (The
    interpreter ignores the option; its ``tl.fma`` rounds once, like the hardware.)"""
    return {"enable_fp_fusion": False} if device.type == "cuda" else {}


def scratch_for(target: HistTarget, num_tensors: int) -> Tensor:
    """The call's int64 ``[num_tensors, num_bins]`` scratch, zero between calls."""
    key = ("fasthist.kernels.scratch", num_tensors)
    buf = target._workspace.get(key)
    if buf is None:
        buf = torch.zeros(num_tensors, target.bins.num_bins, dtype=torch.int64, device=target.step.device)
        target._workspace[key] = buf
    return buf


def finalize_histograms(target: HistTarget, scratch: Tensor, found_inf: Tensor | None) -> None:
    """``step[rows[t]] = scratch[t]; total[rows[t]] += scratch[t]; scratch[t] = 0`` for every
    tensor ``t`` of the call, unless ``found_inf`` is nonzero (then only the zeroing)."""
    n = scratch.shape[0]
    if n == 0:
        return
    nb = target.bins.num_bins
    fb = min(1024, triton.next_power_of_2(nb))
    dummy = scratch
    _finalize_kernel[(n, triton.cdiv(nb, fb))](
        scratch,
        target.rows,
        target.step,
        target.total,
        found_inf if found_inf is not None else dummy,
        NUM_BINS=nb,
        FB=fb,
        HAS_FOUND_INF=found_inf is not None,
        num_warps=4,
    )


class TensorTable:
    """Launch description of a list of same-dtype tensor tuples: ``table`` (int64
    ``[n, width]``: the ``data_ptr`` of each companion, then numel, then the tensor's slot in
    the call) and ``chunks`` (int64 ``[num_chunks, 2]``: table row, first element), one chunk
    per program of ``chunk`` elements. Cached by :meth:`get` on the exact pointers and sizes,
    so a step whose tensors did not move reuses the device tables with no host-to-device copy
    (which also makes the launch capturable in a CUDA graph).
    """

    _cache: OrderedDict = OrderedDict()
    _cache_size = 64

    __slots__ = ("table", "chunks", "num_chunks")

    def __init__(self, table: Tensor, chunks: Tensor) -> None:
        self.table = table
        self.chunks = chunks
        self.num_chunks = chunks.shape[0]

    @classmethod
    def get(
        cls,
        device: torch.device,
        columns: Sequence[Sequence[Tensor]],
        numels: Sequence[int],
        slots: Sequence[int],
        chunk: int,
    ) -> TensorTable:
        ptrs = [list(map(Tensor.data_ptr, col)) for col in columns]
        key = (device, chunk, tuple(numels), tuple(slots), *map(tuple, ptrs))
        hit = cls._cache.get(key)
        if hit is not None:
            cls._cache.move_to_end(key)
            return hit
        rows = [list(r) for r in zip(*ptrs, numels, slots, strict=True)]
        width = len(columns) + 2
        table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width)
        per_tensor = (torch.tensor(list(numels), dtype=torch.int64) + (chunk - 1)) // chunk
        tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), per_tensor)
        first = torch.cumsum(per_tensor, 0) - per_tensor  # first chunk of each tensor
        starts = (torch.arange(tensor_of.numel(), dtype=torch.int64) - first[tensor_of]) * chunk
        chunks = torch.stack([tensor_of, starts], dim=1).contiguous()
        out = cls(table.to(device), chunks.to(device))
        cls._cache[key] = out
        if len(cls._cache) > cls._cache_size:
            cls._cache.popitem(last=False)
        return out


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride(), strict=True) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def dense_views(tensors: Sequence[Tensor]) -> tuple[list[Tensor], bool]:
    """Tensors a flat kernel can walk as ``data_ptr() + k``, k < numel, element k of each
    matching element k of the others: the tensors themselves when they are all dense and
    non-overlapping with one stride pattern (contiguous, transposed, permuted views), else
    contiguous copies (second value True: write them back after the kernel)."""
    first = tensors[0]
    if _dense(first) and all(t.shape == first.shape and t.stride() == first.stride() for t in tensors[1:]):
        return list(tensors), False
    return [t.contiguous() for t in tensors], True
