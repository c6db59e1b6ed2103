"""What every fused optimizer-plus-histogram kernel shares: the histogram device code, the
launch shape, the multi-tensor launch tables and the one decision kernel-or-reference.

Device code (``@triton.jit``):

- :func:`bin_index`: the :class:`fasthist.LogBins` index of float32 values, read off their bits
  exactly as ``LogBins.index`` does (zero, below, log bins, above, non-finite), so Triton, the
  interpreter and PyTorch agree bit for bit.
- :func:`chunk_header`/:func:`column`: which tensor and which ``CHUNK`` elements of it a
  program updates, and the pointer of one of its columns advanced to the chunk.
- :func:`hist_begin` → :func:`hist_add` (per block) → :func:`hist_end`: a program's histogram,
  flushed once into its tensor's row of the int64 scratch with one atomic per non-zero bin.
  Two strategies, chosen per compiled kernel (:func:`histogram_strategy`):

  * ``HIST_SHARED`` (the GPU default): a private ``SMEM_BINS``-word histogram in shared memory,
    zeroed once per program, one ``red.shared.add.u32`` per element (PTX through
    ``tl.inline_asm_elementwise``; masked elements go to a dump word past the real bins), read
    back once after a barrier. Cost per element: the bin index plus one shared atomic, on
    every Triton from 3.6 to 3.9. Triton has no shared-memory allocation in its language, so
    the words are reserved by a never-taken branch that runs a ``tl.gather`` of
    ``SMEM_BINS`` int32 (which Triton stages through shared memory) and addressed through
    Triton's dynamic shared-memory symbol ``global_smem``; this leans on Triton internals, so
    :func:`shared_histogram_problems` checks what the compiler produced before the kernel
    first runs, and the kernel falls back to ``HIST_TL`` with one warning when it is not what
    this code expects.
  * ``HIST_TL``: ``tl.histogram`` per block into a register accumulator. The interpreter's
    path (``tl.inline_asm_elementwise`` does not run there) and the fallback. Same counts:
    the same :func:`bin_index`, masked elements not counted. Up to Triton 3.7 it lowers to
    warp ballots whose cost grows with ``HIST_BINS / 32`` (×10 the untracked step for the
    default bins, with spills); from 3.8 to shared-memory atomics with a zero/read-back of
    the whole histogram per block (×1.4).

Host code:

- :func:`configure` / :data:`SHAPE`: the launch shape of every kernel.
- :func:`kernel_supports`: the one place that decides whether a call runs on the kernels or
  on the reference backend (bins beyond :data:`MAX_BINS`, autograd through the step, float64,
  sparse gradients, betas held in device tensors, dtypes an op has no kernel for).
- :func:`plan_groups`: per dtype a :class:`TensorTable` (table of ``data_ptr``s and chunk
  descriptors, cached while the tensors do not move) and the contiguous copies of tensors a
  flat walk cannot follow (:func:`write_back` after the launch).
- :func:`launch`: one main launch per dtype with the histogram strategy picked, then
  :func:`finalize_histograms`: the ``step``/``total`` windows from the scratch in one launch
  (skipped on ``found_inf``, device-side, no host sync), scratch re-zeroed.

Scratch protocol: a call's scratch is ``int64 [num_tensors, num_bins]`` kept in the
:class:`~fasthist.target.HistTarget` workspace, all zero between calls.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.bins import LogBins
from fasthist.target import HistTarget

__all__ = [
    "HIST_OFF",
    "HIST_TL",
    "HIST_SHARED",
    "HIST_PROBE",
    "HIST_WORDS",
    "MAX_BINS",
    "SHAPE",
    "BinSpec",
    "Plan",
    "TensorTable",
    "bin_index",
    "check_call",
    "chunk_header",
    "column",
    "configure",
    "dense_views",
    "finalize_histograms",
    "hist_add",
    "hist_begin",
    "hist_end",
    "smem_word",
    "histogram_strategy",
    "kernel_supports",
    "launch",
    "launch_options",
    "lerp_coefficients",
    "load",
    "plan_groups",
    "scalar",
    "scratch_for",
    "shared_histogram_problems",
    "slab_kwargs",
    "store",
    "tl_dtype",
    "write_back",
]

#: Largest ``LogBins.num_bins`` the fused kernels take (the default bins pad to 4096): the
#: shared histogram holds ``next_power_of_2(num_bins + 1)`` words (16 KB for the default,
#: 32 KB at this limit). Finer bins run on the reference backend, with a warning.
MAX_BINS = 4096
#: Largest shared histogram of one program, in 4-byte words (32 KB).
MAX_WINDOW = 8192

HIST_OFF, HIST_TL, HIST_SHARED, HIST_PROBE, HIST_WORDS = 0, 1, 2, 3, 4

# -- device code --------------------------------------------------------------------------
# The shared-memory words are addressed from Triton's dynamic shared-memory symbol. PROBE is
# the same instruction stream on address 0, compiled only to learn how much shared memory
# Triton's own code needs (it must need none: nothing of its may share our words).


def _smem_asm(base: str, access: str) -> tl.constexpr:
    """PTX for one element: the address of word ``$1`` (quad ``$4`` for the vector reads
    and writes) from ``base``, then ``access``."""
    return tl.constexpr(f"{{ .reg .b32 %fh_a; mov.u32 %fh_a, {base}; {access} }}")


_ZERO = "mad.lo.u32 %fh_a, $1, 16, %fh_a; st.shared.v4.u32 [%fh_a], {0, 0, 0, 0}; mov.u32 $0, 0;"
_INC = "mad.lo.u32 %fh_a, $1, 4, %fh_a; red.shared.add.u32 [%fh_a], 1; mov.u32 $0, 0;"
_READ = "mad.lo.u32 %fh_a, $4, 16, %fh_a; ld.shared.v4.u32 {$0, $1, $2, $3}, [%fh_a];"
_SMEM_ZERO, _SMEM_INC, _SMEM_READ = (_smem_asm("global_smem", a) for a in (_ZERO, _INC, _READ))
# The hot loop's whole histogram step in PTX: the word of float32 bits $1 (WORD_ASM, built by
# BinSpec: smem_word's four operations, written so ptxas sees an unsigned min, not the
# compare-and-select LLVM makes of it), then the shared atomic.
_WORD_PRE = tl.constexpr("{ .reg .b32 %fh_a, %fh_b, %fh_k, %fh_z; ")
_WORD_POST = "mad.lo.u32 %fh_a, %fh_k, 4, %fh_a; red.shared.add.u32 [%fh_a], 1; mov.u32 $0, 0; }"
_SMEM_WORD_POST = tl.constexpr("mov.u32 %fh_a, global_smem; " + _WORD_POST)
_PROBE_WORD_POST = tl.constexpr("mov.u32 %fh_a, 0; " + _WORD_POST)
_PROBE_ZERO, _PROBE_INC, _PROBE_READ = (_smem_asm("0", a) for a in (_ZERO, _INC, _READ))


@triton.jit
def bin_index(x, SHIFT: tl.constexpr, LOW_KEY: tl.constexpr, ABOVE: tl.constexpr, NONFINITE: tl.constexpr):
    """LogBins index (int32) of float32 ``x``; see :mod:`fasthist.bins` for the layout."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    idx = (bits >> SHIFT) - LOW_KEY + 2
    idx = tl.minimum(tl.maximum(idx, 1), ABOVE)
    idx = tl.where(bits >= 0x7F800000, NONFINITE, idx)
    return tl.where(bits == 0, 0, idx)


@triton.jit
def chunk_header(table_ptr, chunk_ptr, WIDTH: tl.constexpr, CHUNK: tl.constexpr):
    """This program's table row, first element, live element count (<= CHUNK) and slot."""
    pid = tl.program_id(0)
    tid = tl.load(chunk_ptr + 2 * pid)
    start = tl.load(chunk_ptr + 2 * pid + 1)
    row = table_ptr + WIDTH * tid
    numel = tl.minimum(tl.load(row + WIDTH - 2) - start, CHUNK).to(tl.int32)
    slot = tl.load(row + WIDTH - 1)
    return row, start, numel, slot


@triton.jit
def column(row, k, start, DTYPE: tl.constexpr):
    """Column ``k``'s pointer advanced to the chunk once (64-bit); offsets inside are 32-bit."""
    return tl.load(row + k).to(tl.pointer_type(DTYPE)) + start


@triton.jit
def _ptrs(base, offs, ALIGNED: tl.constexpr):
    ptrs = base + offs
    if ALIGNED:  # the block starts 16-byte aligned: vector access
        ptrs = tl.multiple_of(ptrs, 16)
    return ptrs


@triton.jit
def load(base, offs, mask, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    """``base[offs]`` as float32; unmasked (vector loads) for a full chunk."""
    ptrs = _ptrs(base, offs, ALIGNED)
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def store(base, offs, value, mask, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    ptrs = _ptrs(base, offs, ALIGNED)
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@triton.jit
def smem_word(
    x, SHIFT: tl.constexpr, LOW_KEY: tl.constexpr, ABOVE: tl.constexpr, NONFINITE: tl.constexpr, WINDOW: tl.constexpr
):
    """The shared-histogram word of float32 ``x``. ``WINDOW`` (the default bins): one word per
    shifted key from ``LOW_KEY - 1`` up to the largest (NaN), below that 1 (below) or 0 (exact
    zero) -- four integer operations, the above-range and non-finite words folded into their
    bins once per program by :func:`hist_end`. Otherwise the bin itself (:func:`bin_index`)."""
    if WINDOW:
        b2 = x.to(tl.uint32, bitcast=True) << 1  # the sign bit dropped
        key = (b2 >> (SHIFT + 1)).to(tl.int32)
        return tl.maximum(key - (LOW_KEY - 2), tl.minimum(b2, 1).to(tl.int32))
    return bin_index(x, SHIFT, LOW_KEY, ABOVE, NONFINITE)


@triton.jit
def hist_begin(
    never,
    spare_ptr,
    HIST: tl.constexpr,
    HIST_BINS: tl.constexpr,
    DUMP: tl.constexpr,
    SMEM_BINS: tl.constexpr,
    SLAB: tl.constexpr,
):
    """Start a program's histogram: the ``tl.histogram`` accumulator (``HIST_TL``; over
    words for ``HIST_WORDS``), or zeroed shared words 0..DUMP (``HIST_SHARED``, four per
    store, ``SLAB`` = one quad per thread at a time; ``never`` is a runtime-false condition
    guarding the branch that reserves them, ``spare_ptr`` any int64 pointer it may name)."""
    acc = tl.zeros([1], dtype=tl.int32)
    if HIST == 1:
        acc = tl.zeros([HIST_BINS], dtype=tl.int32)
    if HIST == 4:
        acc = tl.zeros([SMEM_BINS], dtype=tl.int32)
    if HIST == 2 or HIST == 3:
        for s in range(0, DUMP // 4 + 1, SLAB):
            q = s + tl.arange(0, SLAB)
            if HIST == 2:
                tl.inline_asm_elementwise(_SMEM_ZERO, "=r,r", [q], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(_PROBE_ZERO, "=r,r", [q], dtype=tl.int32, is_pure=False, pack=1)
        if HIST == 2:
            if never:  # never runs; makes Triton allocate SMEM_BINS words of shared memory
                b = tl.arange(0, SMEM_BINS)
                words = tl.load(spare_ptr + b).to(tl.int32)
                tl.store(spare_ptr + b, tl.gather(words, (b * 7) % SMEM_BINS, 0).to(tl.int64))
        tl.debug_barrier()
    return acc


@triton.jit
def hist_add(
    acc,
    x,
    mask,
    MASKED: tl.constexpr,
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
    """Count the bin of every live element of a block of float32 values ``x``."""
    if HIST == 1:
        idx = bin_index(x, SHIFT, LOW_KEY, ABOVE, NONFINITE)
        if MASKED:
            acc += tl.histogram(idx, HIST_BINS, mask=mask)
        else:
            acc += tl.histogram(idx, HIST_BINS)
    if (HIST == 2 or HIST == 3) and WINDOW and not MASKED:
        bits = x.to(tl.int32, bitcast=True)
        if HIST == 2:
            tl.inline_asm_elementwise(
                _WORD_PRE + WORD_ASM + _SMEM_WORD_POST, "=r,r", [bits], dtype=tl.int32, is_pure=False, pack=1
            )
        else:
            tl.inline_asm_elementwise(
                _WORD_PRE + WORD_ASM + _PROBE_WORD_POST, "=r,r", [bits], dtype=tl.int32, is_pure=False, pack=1
            )
    elif HIST >= 2:
        w = smem_word(x, SHIFT, LOW_KEY, ABOVE, NONFINITE, WINDOW)
        if MASKED:  # dead lanes count in the dump word, past every real one
            w = tl.where(mask, w, DUMP)
        if HIST == 2:
            tl.inline_asm_elementwise(_SMEM_INC, "=r,r", [w], dtype=tl.int32, is_pure=False, pack=1)
        if HIST == 3:
            tl.inline_asm_elementwise(_PROBE_INC, "=r,r", [w], dtype=tl.int32, is_pure=False, pack=1)
        if HIST == 4:
            acc += tl.histogram(w, SMEM_BINS)
    return acc


@triton.jit
def _fold(b, SHIFT: tl.constexpr, LOW_KEY: tl.constexpr, ABOVE: tl.constexpr, NONFINITE: tl.constexpr):
    """The bin of window word ``b``: itself up to ``ABOVE``; finite keys above the range to
    ``ABOVE``, non-finite ones to ``NONFINITE``."""
    return tl.where(b >= (0x7F800000 >> SHIFT) - LOW_KEY + 2, NONFINITE, tl.minimum(b, ABOVE))


@triton.jit
def _flush_quads(
    row_ptr,
    start,
    stop,
    FOLD: tl.constexpr,
    CHECK: tl.constexpr,
    HIST: tl.constexpr,
    SHIFT: tl.constexpr,
    LOW_KEY: tl.constexpr,
    ABOVE: tl.constexpr,
    NONFINITE: tl.constexpr,
    DUMP: tl.constexpr,
    SLAB: tl.constexpr,
):
    """Add shared words ``4*start .. 4*stop`` to their bins of the row (``FOLD``: words past
    the log bins; ``CHECK``: the range reaches the dump word, which is not added)."""
    for s in range(start, stop, SLAB):
        q = s + tl.arange(0, SLAB)
        if HIST == 2:
            words = tl.inline_asm_elementwise(
                _SMEM_READ, "=r,=r,=r,=r,r", [q], dtype=(tl.int32,) * 4, is_pure=False, pack=1
            )
        else:
            words = tl.inline_asm_elementwise(
                _PROBE_READ, "=r,=r,=r,=r,r", [q], dtype=(tl.int32,) * 4, is_pure=False, pack=1
            )
        for j in tl.static_range(4):
            b = 4 * q + j
            live = words[j] != 0
            bins = b
            if FOLD:
                bins = _fold(b, SHIFT, LOW_KEY, ABOVE, NONFINITE)
            if CHECK:
                live = live & (b < DUMP)
            tl.atomic_add(row_ptr + bins, words[j].to(tl.int64), mask=live, sem="relaxed")


@triton.jit
def hist_end(
    acc,
    row_ptr,
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
):
    """``row_ptr[bin] += count`` for the non-zero bins of the program (int64 row): from the
    ``tl.histogram`` accumulator, or from the shared words, four per load, the words past
    the log bins folded (``WINDOW``) in a second loop."""
    if HIST == 1:
        b = tl.arange(0, HIST_BINS)
        tl.atomic_add(row_ptr + b, acc.to(tl.int64), mask=(acc != 0) & (b < NUM_BINS), sem="relaxed")
    if HIST == 4:  # the interpreter's twin of the shared words
        b = tl.arange(0, SMEM_BINS)
        bins = b
        if WINDOW:
            bins = _fold(b, SHIFT, LOW_KEY, ABOVE, NONFINITE)
        tl.atomic_add(row_ptr + bins, acc.to(tl.int64), mask=(acc != 0) & (b < DUMP), sem="relaxed")
    if HIST == 2 or HIST == 3:
        tl.debug_barrier()
        quads = DUMP // 4 + 1
        plain = quads
        if WINDOW:
            plain = (ABOVE // 4) // SLAB * SLAB  # whole slabs of words below ABOVE: no fold
        _flush_quads(row_ptr, 0, plain, False, not WINDOW, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, DUMP, SLAB)
        if WINDOW:
            _flush_quads(row_ptr, plain, quads, True, True, HIST, SHIFT, LOW_KEY, ABOVE, NONFINITE, DUMP, SLAB)


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


# -- launch shape -------------------------------------------------------------------------
class LaunchShape:
    """``block`` elements per inner iteration, ``iters`` iterations per program (``chunk =
    block * iters`` elements of one tensor per program), ``num_warps`` per program, and the
    histogram strategy: ``"auto"`` (shared memory where the compiled kernel passes its
    check, else ``tl.histogram``), ``"shared"`` (the same, warning when it cannot), or
    ``"tl"`` (always ``tl.histogram``)."""

    __slots__ = ("block", "iters", "num_warps", "histogram")

    def __init__(self, block: int, iters: int, num_warps: int, histogram: str) -> None:
        self.block, self.iters, self.num_warps, self.histogram = block, iters, num_warps, histogram

    @property
    def chunk(self) -> int:
        return self.block * self.iters


# Chosen with bench/sass_report.py (static sm_90 cost, Triton 3.6-3.9): the per-program
# histogram zero/read-back/flush is spread over 16k elements (block 1024 x 16).
DEFAULT_SHAPE = (1024, 16, 4, "auto")
SHAPE = LaunchShape(*DEFAULT_SHAPE)
_HISTOGRAM_CHOICES = ("auto", "shared", "tl")


def configure(
    block: int = DEFAULT_SHAPE[0],
    iters: int = DEFAULT_SHAPE[1],
    num_warps: int = DEFAULT_SHAPE[2],
    histogram: str = DEFAULT_SHAPE[3],
) -> None:
    """Set the launch shape of every fused kernel (see :class:`LaunchShape`); results do not
    depend on it. For tuning (``bench/sass_report.py``, ``bench/gpu_report.py --sweep``)."""
    for name, value in (("block", block), ("iters", iters), ("num_warps", num_warps)):
        if not isinstance(value, int) or value < 1 or (name != "iters" and value & (value - 1)):
            raise ValueError(f"Invalid {name}: {value}; expected a positive int (a power of two for block, num_warps)")
    if block < 32 * num_warps:
        # every element must live in exactly one thread: a smaller block is replicated
        # across threads, and the shared histogram would count it several times
        raise ValueError(f"Invalid block: {block}; expected at least 32 * num_warps = {32 * num_warps}")
    if histogram not in _HISTOGRAM_CHOICES:
        raise ValueError(f"Invalid histogram: {histogram!r}; expected one of {', '.join(_HISTOGRAM_CHOICES)}")
    SHAPE.block, SHAPE.iters, SHAPE.num_warps, SHAPE.histogram = block, iters, num_warps, histogram
    PLANS.clear()  # their tables were cut in chunks of the old size


# -- host code ----------------------------------------------------------------------------
class BinSpec:
    """The constexpr description of a LogBins layout for the kernels: the bin layout, the
    ``tl.histogram`` size, and the shared histogram's words (see :func:`smem_word`): one per
    shifted key from ``low_key - 1`` up when that fits in :data:`MAX_WINDOW` words (``WINDOW``),
    else one per bin; ``DUMP`` is the word masked lanes count in."""

    __slots__ = ("num_bins", "hist_bins", "smem_bins", "window", "dump", "shift", "low_key", "above", "nonfinite")

    def __init__(self, bins: LogBins) -> None:
        self.num_bins = bins.num_bins
        self.hist_bins = triton.next_power_of_2(bins.num_bins)  # tl.histogram needs a power of two
        self.shift = bins.shift
        self.low_key = bins.low_key
        self.above = bins.above
        self.nonfinite = bins.nonfinite
        window_dump = (1 << (31 - bins.shift)) - bins.low_key + 2  # one past the word of the largest key
        self.window = window_dump < MAX_WINDOW
        self.dump = window_dump if self.window else bins.num_bins
        self.smem_bins = triton.next_power_of_2(self.dump + 1)

    def kwargs(self) -> dict[str, int]:
        return {
            "SHIFT": self.shift,
            "LOW_KEY": self.low_key,
            "ABOVE": self.above,
            "NONFINITE": self.nonfinite,
            "NUM_BINS": self.num_bins,
            "HIST_BINS": self.hist_bins,
            "WINDOW": self.window,
            "DUMP": self.dump,
            "SMEM_BINS": self.smem_bins,
            "WORD_ASM": self.word_asm(),
        }

    def word_asm(self) -> str:
        """PTX of :func:`smem_word` (``WINDOW``) from float32 bits ``$1`` into ``%fh_k``."""
        if not self.window:
            return ""
        return (
            f"shl.b32 %fh_b, $1, 1; shr.u32 %fh_k, %fh_b, {self.shift + 1}; min.u32 %fh_z, %fh_b, 1; "
            f"sub.s32 %fh_k, %fh_k, {self.low_key - 2}; max.s32 %fh_k, %fh_k, %fh_z; "
        )


NO_BINS = {
    "SHIFT": 0,
    "LOW_KEY": 0,
    "ABOVE": 1,
    "NONFINITE": 1,
    "NUM_BINS": 1,
    "HIST_BINS": 1,
    "WINDOW": False,
    "DUMP": 1,
    "SMEM_BINS": 2,
    "WORD_ASM": "",
}

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def slab_kwargs(bin_kwargs: dict[str, Any], num_warps: int) -> dict[str, Any]:
    """``bin_kwargs`` plus ``SLAB`` (one element per thread: the shared histogram is zeroed,
    read and flushed a quad of words per thread at a time, never two threads on one quad) and
    ``SMEM_BINS`` raised to whole slabs of quads."""
    slab = 32 * num_warps
    return dict(bin_kwargs, SLAB=slab, SMEM_BINS=max(bin_kwargs["SMEM_BINS"], 4 * slab))


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


def scalar(x: float | Tensor, name: str, op: str) -> float:
    """A hyper-parameter as a Python float (a one-element tensor is read: a host sync)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise RuntimeError(
                f"fasthist {op}: {name} must be a float or a one-element Tensor, but got shape {tuple(x.shape)}"
            )
        return float(x.item())
    return float(x)


def lerp_coefficients(weight: float) -> tuple[float, float, bool]:
    """``(w, coeff, small)`` for torch's CPU ``lerp(start, end, w)``: ``fma(w, end - start,
    start)`` when ``|w| < 0.5``, else ``fma(w - 1, end - start, end)``, with ``w`` in float32."""
    w = np.float32(weight)
    small = bool(abs(w) < 0.5)
    return float(w), float(w if small else w - np.float32(1)), small


# -- kernel or reference ------------------------------------------------------------------
_KERNEL_DTYPES = {
    "adam": (torch.float32, torch.bfloat16, torch.float16, torch.complex64),
    "rmsprop": (torch.float32, torch.bfloat16, torch.float16, torch.complex64),
    "adagrad": (torch.float32, torch.bfloat16, torch.float16, torch.complex64),
    # float16 AdaBelief steps in float32 with float32 states (as the package does): reference
    "adabelief": (torch.float32, torch.bfloat16),
}
_WARNED: set = set()


def kernel_supports(op: str, hist: HistTarget | None, params: Sequence[Tensor], grads: Sequence[Tensor], **kw) -> bool:
    """True when the fused kernel of ``op`` runs this call; False sends it to the reference
    backend: bins beyond :data:`MAX_BINS` (with one warning per layout), ``differentiable``,
    sparse gradients, betas held in device tensors (reading them would synchronise), and
    parameter dtypes ``op`` has no kernel for (float64, complex128; float16 AdaBelief)."""
    if hist is not None and hist.bins.num_bins > MAX_BINS:
        if hist.bins not in _WARNED:
            _WARNED.add(hist.bins)
            warnings.warn(
                f"fasthist: {hist.bins} has {hist.bins.num_bins} bins, more than the fused kernels take "
                f"({MAX_BINS}); these groups run on the reference backend",
                stacklevel=5,
            )
        return False
    if kw.get("differentiable") or kw.get("has_sparse_grad") or any(g.is_sparse for g in grads):
        return False
    if any(isinstance(kw.get(k), Tensor) and kw[k].device.type != "cpu" for k in ("beta1", "beta2")):
        return False
    dtypes = _KERNEL_DTYPES[op]
    return all(p.dtype in dtypes for p in params)


def check_call(op: str, n: int, lists: dict[str, Sequence], device: torch.device, hist: HistTarget | None) -> None:
    """Every list of a call holds ``n`` entries, and the histograms live on the parameters' device."""
    for name, lst in lists.items():
        if len(lst) != n:
            raise RuntimeError(f"fasthist {op}: expected {n} {name}, but got {len(lst)}")
    if hist is not None and hist.step.device != device:
        raise RuntimeError(f"fasthist {op}: histograms on {hist.step.device}, but parameters on {device}")


# -- histogram strategy -------------------------------------------------------------------
_STRATEGY: dict = {}
_SMEM_SYMBOL = re.compile(r"\.extern\s+\.shared\s+\.align\s+\d+\s+\.b8\s+global_smem\[\]")


def shared_histogram_problems(ptx: str, shared_bytes: int, probe_shared_bytes: int, smem_bins: int) -> list[str]:
    """What stops the shared-memory histogram from being used safely in a compiled kernel
    (empty: nothing). ``ptx``/``shared_bytes``: the ``HIST_SHARED`` kernel; ``probe_*``: the
    same kernel compiled as ``HIST_PROBE`` (no reservation, address 0), whose shared memory
    is what Triton's own code needs outside the reservation."""
    problems = []
    if probe_shared_bytes != 0:
        problems.append(
            f"Triton's own code uses {probe_shared_bytes} bytes of shared memory, which the histogram would overwrite"
        )
    if shared_bytes < 4 * smem_bins:
        problems.append(f"{shared_bytes} bytes of shared memory reserved, {4 * smem_bins} needed")
    if not _SMEM_SYMBOL.search(ptx):
        problems.append("no dynamic shared-memory symbol global_smem in the PTX")
    if any(op not in ptx for op in ("red.shared.add.u32", "ld.shared.v4.u32", "st.shared.v4.u32")):
        problems.append("the shared-memory histogram instructions are missing from the PTX")
    if len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx)) < 2:
        problems.append("the barriers around the shared histogram are missing")
    return problems


def histogram_strategy(
    kernel: Any, grid: tuple, args: Sequence[Any], kwargs: dict[str, Any], device: torch.device
) -> int:
    """``HIST_SHARED`` where the compiled kernel passes :func:`shared_histogram_problems`
    (checked once per specialisation, by compiling it and its probe before it first runs),
    else ``HIST_TL`` (one warning); ``HIST_TL`` whenever ``configure(histogram="tl")``. On
    the interpreter (no inline PTX there) ``HIST_WORDS``, the shared strategy's twin: the same
    words and fold, counted with ``tl.histogram``."""
    if SHAPE.histogram == "tl":
        return HIST_TL
    if device.type != "cuda":
        return HIST_WORDS
    aligned = tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, Tensor))
    key = (kernel, device, aligned, tuple(sorted(kwargs.items())))
    choice = _STRATEGY.get(key)
    if choice is None:
        try:
            real = kernel.warmup(*args, grid=grid, **dict(kwargs, HIST=HIST_SHARED))
            probe = kernel.warmup(*args, grid=grid, **dict(kwargs, HIST=HIST_PROBE))
            problems = shared_histogram_problems(
                real.asm["ptx"], real.metadata.shared, probe.metadata.shared, kwargs["SMEM_BINS"]
            )
        except Exception as e:  # noqa: BLE001 - any compile failure means: not this strategy
            problems = [f"compiling it failed: {type(e).__name__}: {e}"]
        choice = HIST_TL if problems else HIST_SHARED
        if problems and ("warned", *problems) not in _STRATEGY:
            _STRATEGY[("warned", *problems)] = True
            warnings.warn(
                f"fasthist: the shared-memory histogram cannot be used with Triton {triton.__version__} "
                f"({'; '.join(problems)}); falling back to tl.histogram (slower, same counts)",
                stacklevel=5,
            )
        _STRATEGY[key] = choice
    return choice


# -- scratch and histogram windows --------------------------------------------------------
def scratch_for(target: HistTarget, num_tensors: int) -> Tensor:
    """The call's int64 ``[num_tensors, num_bins]`` scratch, zero between calls."""
    return target.buffer(
        ("fasthist.kernels.scratch", num_tensors),
        lambda: torch.zeros(num_tensors, target.bins.num_bins, dtype=torch.int64, device=target.step.device),
    )


def finalize_histograms(target: HistTarget, scratch: Tensor, found_inf: Tensor | None) -> None:
    """``step[rows[t]] = scratch[t]; total[rows[t]] += scratch[t]; scratch[t] = 0`` for every
    tensor ``t`` of the call, unless ``found_inf`` is nonzero (then only the zeroing)."""
    n = scratch.shape[0]
    if n == 0:
        return
    nb = target.bins.num_bins
    fb = min(1024, triton.next_power_of_2(nb))
    _finalize_kernel[(n, triton.cdiv(nb, fb))](
        scratch,
        target.rows,
        target.step,
        target.total,
        found_inf if found_inf is not None else scratch,
        NUM_BINS=nb,
        FB=fb,
        HAS_FOUND_INF=found_inf is not None,
        num_warps=4,
    )


# -- launch tables ------------------------------------------------------------------------
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


class Plan:
    """Per dtype ``(dtype, launch tables, aligned)`` (aligned: every tensor of the launch
    starts 16-byte aligned, so full chunks use vector access), and the (originals,
    contiguous copies) of the tensor tuples a flat walk cannot handle in place."""

    __slots__ = ("groups", "write_back")

    def __init__(self, groups: list[tuple[torch.dtype, TensorTable, bool]], write_back: list) -> None:
        self.groups = groups
        self.write_back = write_back


# Plans by (op, device, chunk, param ids, data_ptrs of every column): a step whose tensors
# did not move (the usual case, also under CUDA-graph replay) skips all per-tensor Python work.
PLANS: OrderedDict = OrderedDict()
_PLANS_SIZE = 64  # one per param group, optimizer and device, usually


def _row(op: str, i: int, ts: list[Tensor | None], device: torch.device) -> list[Tensor | None]:
    """Tensor tuple ``i`` checked (every companion has the parameter's dtype, shape and
    device) and, for complex parameters, viewed as real pairs."""
    p = ts[0]
    if p.is_complex():
        ts = [torch.view_as_real(t) if t is not None else None for t in ts]
        p = ts[0]
    for k, t in enumerate(ts[1:], start=1):
        if t is not None and (t.dtype != p.dtype or t.device != device or t.shape != p.shape):
            what = f"grad {i}" if k == 1 else f"the state of parameter {i}"
            raise TypeError(
                f"fasthist {op}: {what} must be {p.dtype} of shape {tuple(p.shape)} on {device} like its "
                f"parameter, but got {t.dtype} {tuple(t.shape)} on {t.device}"
            )
    return ts


def plan_groups(op: str, device: torch.device, columns: Sequence[Sequence[Tensor | None]]) -> Plan:
    """Tables for ``columns[k][i]`` (column 0 the parameters, 1 the grads; ``None`` for an
    unused column, which gets the parameter's pointer), cut in chunks of ``SHAPE.chunk`` and
    cached on the tensors' ids and data pointers."""
    n = len(columns[0])
    chunk = SHAPE.chunk
    key = (
        op,
        device,
        chunk,
        tuple(map(id, columns[0])),
        *(tuple(t.data_ptr() if t is not None else 0 for t in col) for col in columns),
    )
    plan = PLANS.get(key)
    if plan is not None:
        PLANS.move_to_end(key)
        return plan
    groups: dict[torch.dtype, tuple[list[list[Tensor]], list[int], list[int]]] = {}
    copies: list[tuple[list[Tensor], list[Tensor]]] = []
    for i in range(n):
        ts = _row(op, i, [col[i] for col in columns], device)
        present = [t for t in ts if t is not None]
        work, copied = dense_views(present)
        if copied:
            copies.append((present, work))
        it = iter(work)
        full = [next(it) if t is not None else None for t in ts]
        full = [t if t is not None else full[0] for t in full]
        cols, numels, slots = groups.setdefault(full[0].dtype, ([[] for _ in columns], [], []))
        for col, t in zip(cols, full, strict=True):
            col.append(t)
        numels.append(full[0].numel())
        slots.append(i)
    plan = Plan(
        [
            (
                dt,
                TensorTable.get(device, cols, numels, slots, chunk),
                all(t.data_ptr() % 16 == 0 for col in cols for t in col),
            )
            for dt, (cols, numels, slots) in groups.items()
        ],
        copies,
    )
    if not copies:  # copies move every step: nothing to reuse
        PLANS[key] = plan
        if len(PLANS) > _PLANS_SIZE:
            PLANS.popitem(last=False)
    return plan


def write_back(plan: Plan, grads_written: bool = False) -> None:
    """Copy the contiguous working copies back into the tensors they stand for (the grad,
    column 1, only when the kernel wrote it)."""
    for originals, work in plan.write_back:
        for k, (orig, tmp) in enumerate(zip(originals, work, strict=True)):
            if k == 1 and not grads_written:
                continue
            orig.copy_(tmp)


def launch(
    kernel: Any,
    plan: Plan,
    hist: HistTarget | None,
    args: Callable[[TensorTable, Tensor], tuple],
    constexprs: dict[str, Any],
    device: torch.device,
    found_inf: Tensor | None = None,
) -> None:
    """One launch of ``kernel`` per dtype group of ``plan`` (positional arguments
    ``args(tables, scratch)``, which start with the table, the chunks and the scratch), then
    the histogram windows. Every kernel takes the shape, dtype, alignment and histogram
    constexprs added here."""
    num_tensors = sum(tables.table.shape[0] for _, tables, _ in plan.groups)
    scratch = scratch_for(hist, num_tensors) if hist is not None else None
    bin_kwargs = BinSpec(hist.bins).kwargs() if hist is not None else NO_BINS
    for dtype, tables, aligned in plan.groups:
        if tables.num_chunks == 0:
            continue
        grid = (tables.num_chunks,)
        call_args = args(tables, scratch if scratch is not None else tables.table)
        kw = dict(
            constexprs,
            DTYPE=tl_dtype(dtype),
            BLOCK=SHAPE.block,
            ITERS=SHAPE.iters,
            ALIGNED=aligned,
            HIST=HIST_OFF,
            num_warps=SHAPE.num_warps,
            **slab_kwargs(bin_kwargs, SHAPE.num_warps),
            **launch_options(device),
        )
        if hist is not None:
            kw["HIST"] = histogram_strategy(kernel, grid, call_args, kw, device)
        kernel[grid](*call_args, **kw)
    if hist is not None:
        finalize_histograms(hist, scratch, found_inf)
