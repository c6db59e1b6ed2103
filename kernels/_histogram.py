"""The histogram every fused kernel accumulates: device code, strategy, guard and windows.

Device code (``@triton.jit``):

- :func:`bin_index`: the :class:`fasthist.LogBins` index of float32 values, read off their bits
  exactly as ``LogBins.index`` does (zero, below, log bins, above, non-finite), so Triton, the
  interpreter and PyTorch agree bit for bit.
- :func:`hist_begin` → :func:`hist_add` (per block) → :func:`hist_end`: a program's histogram,
  flushed once into its tensor's row of the int64 scratch with one atomic per non-zero bin.
  The strategy is chosen per compiled kernel (:func:`histogram_strategy`):

  * ``HIST_SHARED`` (the GPU default): a private histogram in shared memory, zeroed once per
    program, one ``red.shared.add.u32`` per element, read back once after a barrier and
    flushed. For the default bins its words are a *window*: one word per shifted key
    ``bits(|x|) >> shift`` from the key below the range up (:func:`smem_word`: four integer
    operations, no clamps; in the unmasked hot loop written in PTX, 6 SASS instructions per
    element with the atomic); the words past the log bins are folded into the above-range and
    non-finite bins once per program. Layouts whose window would exceed :data:`MAX_WINDOW`
    words use one word per bin (:func:`bin_index`). Masked lanes count in a dump word past
    every real one. Triton's language has no shared-memory allocation, so the words are
    reserved by a never-taken branch that runs a ``tl.gather`` of ``SMEM_BINS`` int32 (which
    Triton stages through shared memory) and addressed through Triton's dynamic
    shared-memory symbol ``global_smem``. This leans on Triton internals:
    :func:`shared_histogram_problems` (:mod:`._smem_guard`) checks by structure what the
    compiler produced, on the specialisation that will launch, before it first runs: a
    barrier on every path between zeroing, increments and read-back, Triton's own shared
    accesses only inside the reservation, no element in two threads, the declared shared
    memory covering the words; where a rule fails, or the compile does, the kernel uses
    ``HIST_TL`` with one short warning naming it. (``HIST_PROBE``, the same code addressed
    from 0 without the reservation, is compiled by ``bench/sass_report.py`` only, to count
    the instructions that run.)
  * ``HIST_TL``: ``tl.histogram`` per block into a register accumulator, the fallback. Up to
    Triton 3.7 it lowers to warp ballots whose cost grows with the number of bins (×10 the
    untracked step for the default bins, with spills); from 3.8 to shared-memory atomics with
    a zero/read-back of the whole histogram per block (×1.4).
  * ``HIST_WORDS``: the interpreter's twin of ``HIST_SHARED`` (inline PTX does not run
    there): the same words, dump word and fold, counted with ``tl.histogram``.

  A second quantity (staleness, :func:`hist_add`'s ``HIGH``) counts in the high 16 bits of
  the same words (of the same accumulator for ``HIST_TL``/``HIST_WORDS``): a program counts
  at most ``CHUNK`` elements per word, and the launch refuses a chunk over
  :data:`~kernels._common.MAX_STALENESS_CHUNK`, so the halves never carry into each other. No
  second region, zeroing, barrier or read-back; :func:`hist_end` (``PAIRED``) flushes the
  halves into two consecutive scratch rows, :func:`finalize_histograms` into the target's
  ``staleness`` windows.

Host code: :class:`BinSpec` (the layout's constexprs), :func:`histogram_strategy` and its
guard, :func:`scratch_for`/:func:`finalize_histograms`: a call's int64 ``[num_tensors,
num_bins]`` scratch (zero between calls, kept in the :class:`~fasthist.target.HistTarget`)
and the one launch that moves it into the ``step``/``total`` windows (skipped on
``found_inf``, device-side, no host sync).
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.bins import LogBins
from fasthist.target import HistTarget

from ._smem_guard import RESERVED_MARK, shared_histogram_problems

__all__ = [
    "HIST_OFF",
    "HIST_TL",
    "HIST_SHARED",
    "HIST_PROBE",
    "HIST_WORDS",
    "MAX_BINS",
    "MAX_WINDOW",
    "NO_BINS",
    "BinLayout",
    "BinSpec",
    "bin_index",
    "bin_layout",
    "finalize_histograms",
    "hist_add",
    "hist_begin",
    "hist_end",
    "histogram_strategy",
    "scratch_for",
    "shared_histogram_problems",
    "smem_word",
]

#: Largest ``LogBins.num_bins`` the fused kernels take: the shared histogram is at most
#: :data:`MAX_WINDOW` words (32 KB; the default bins' window of 6,274 words pads to it, one
#: word per bin at this limit needs 4,097). Finer bins run on the reference backend, with a
#: warning.
MAX_BINS = 4096


#: Largest shared histogram of one program, in 4-byte words (32 KB).
MAX_WINDOW = 8192


HIST_OFF, HIST_TL, HIST_SHARED, HIST_PROBE, HIST_WORDS = 0, 1, 2, 3, 4
#: what ``opt.backends()`` calls each strategy a launch used
HIST_NAMES = {HIST_TL: "tl.histogram", HIST_SHARED: "shared", HIST_PROBE: "shared (probe)", HIST_WORDS: "words"}


def _smem_asm(base: str, access: str) -> tl.constexpr:
    """PTX for one element: the address of word ``$1`` (quad ``$4`` for the vector reads
    and writes) from ``base``, then ``access``."""
    return tl.constexpr(f"{{ .reg .b32 %fh_a; mov.u32 %fh_a, {base}; {access} }}")


_ZERO = "mad.lo.u32 %fh_a, $1, 16, %fh_a; st.shared.v4.u32 [%fh_a], {0, 0, 0, 0}; mov.u32 $0, 0;"


_INC = "mad.lo.u32 %fh_a, $1, 4, %fh_a; red.shared.add.u32 [%fh_a], 1; mov.u32 $0, 0;"


# A second quantity counts in the upper half of the same words (see hist_add).
_INC_HIGH = _INC.replace("], 1;", "], 65536;")


_READ = "mad.lo.u32 %fh_a, $4, 16, %fh_a; ld.shared.v4.u32 {$0, $1, $2, $3}, [%fh_a];"


# The first instruction of the never-taken branch that reserves the shared histogram: the
# guard reads the reservation's extent off the PTX from it.
_RESERVED = tl.constexpr(f"mov.u32 $0, $1; // {RESERVED_MARK}")


_SMEM_ZERO, _SMEM_INC, _SMEM_READ, _SMEM_INC_HIGH = (
    _smem_asm("global_smem", a) for a in (_ZERO, _INC, _READ, _INC_HIGH)
)


# The hot loop's whole histogram step in PTX: the word of float32 bits $1 (WORD_ASM, built by
# BinSpec: smem_word's four operations, written so ptxas sees an unsigned min, not the
# compare-and-select LLVM makes of it), then the shared atomic.
_WORD_PRE = tl.constexpr("{ .reg .b32 %fh_a, %fh_b, %fh_k; ")


_WORD_POST = "mad.lo.u32 %fh_a, %fh_k, 4, %fh_a; red.shared.add.u32 [%fh_a], 1; mov.u32 $0, 0; }"


_SMEM_WORD_POST = tl.constexpr("mov.u32 %fh_a, global_smem; " + _WORD_POST)


_PROBE_WORD_POST = tl.constexpr("mov.u32 %fh_a, 0; " + _WORD_POST)


_SMEM_WORD_POST_HIGH, _PROBE_WORD_POST_HIGH = (
    tl.constexpr(post.value.replace("], 1;", "], 65536;")) for post in (_SMEM_WORD_POST, _PROBE_WORD_POST)
)


_PROBE_ZERO, _PROBE_INC, _PROBE_READ, _PROBE_INC_HIGH = (_smem_asm("0", a) for a in (_ZERO, _INC, _READ, _INC_HIGH))


@triton.jit
def bin_index(x, SHIFT: tl.constexpr, LOW_KEY: tl.constexpr, ABOVE: tl.constexpr, NONFINITE: tl.constexpr):
    """LogBins index (int32) of float32 ``x``; see :mod:`fasthist.bins` for the layout."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    idx = (bits >> SHIFT) - LOW_KEY + 2
    idx = tl.minimum(tl.maximum(idx, 1), ABOVE)
    idx = tl.where(bits >= 0x7F800000, NONFINITE, idx)
    return tl.where(bits == 0, 0, idx)


@triton.jit
def smem_word(
    x, SHIFT: tl.constexpr, LOW_KEY: tl.constexpr, ABOVE: tl.constexpr, NONFINITE: tl.constexpr, WINDOW: tl.constexpr
):
    """The shared-histogram word of float32 ``x``. ``WINDOW`` (the default bins): one word per
    shifted key from ``LOW_KEY - 1`` up to the largest (NaN), below that 1 (below) or 0 (exact
    zero): ``min(max(key - LOW_KEY + 2, 1), b2)`` with ``b2 = bits(x) << 1`` (the sign bit
    dropped), four integer operations after the key, the above-range and non-finite words
    folded into their bins once per program by :func:`hist_end`. Otherwise the bin itself
    (:func:`bin_index`).

    Exact for every layout: ``b2`` is 0 only for ±0, and for any other ``x`` it is at least
    ``max(2, 2 * key) >= key + 1 >= key - LOW_KEY + 2`` (``LOW_KEY >= 1``), so the ``min``
    sends exactly the zeros to word 0 -- also when ``LOW_KEY`` is 1 and key 0 (zeros and the
    smallest subnormals) is the below-range word itself."""
    if WINDOW:
        b2 = x.to(tl.uint32, bitcast=True) << 1
        key = (b2 >> (SHIFT + 1)).to(tl.int32)
        word = tl.maximum(key - (LOW_KEY - 2), 1).to(tl.uint32)
        return tl.minimum(word, b2).to(tl.int32)
    return bin_index(x, SHIFT, LOW_KEY, ABOVE, NONFINITE)


@triton.jit
def hist_begin(never, spare_ptr, HIST: tl.constexpr, BINS: tl.constexpr):
    """Start a program's histogram: the ``tl.histogram`` accumulator (``HIST_TL``; over
    words for ``HIST_WORDS``), or zeroed shared words 0..DUMP (``HIST_SHARED``, four per
    store, ``SLAB`` = one quad per thread at a time; ``never`` is a runtime-false condition
    guarding the branch that reserves them, ``spare_ptr`` any int64 pointer it may name).
    ``BINS`` is the layout (:class:`BinLayout`)."""
    # a layout field is a plain int inside the function: Triton 3.6/3.7 need it bound as a
    # constexpr to be a shape (3.9 takes it as it is)
    SMEM_BINS: tl.constexpr = BINS.SMEM_BINS
    HIST_BINS: tl.constexpr = BINS.HIST_BINS
    acc = tl.zeros([1], dtype=tl.int32)
    if HIST == 1:
        acc = tl.zeros([HIST_BINS], dtype=tl.int32)
    if HIST == 4:
        acc = tl.zeros([SMEM_BINS], dtype=tl.int32)
    if HIST == 2 or HIST == 3:
        for s in range(0, BINS.DUMP // 4 + 1, BINS.SLAB):
            q = s + tl.arange(0, BINS.SLAB)
            if HIST == 2:
                tl.inline_asm_elementwise(_SMEM_ZERO, "=r,r", [q], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(_PROBE_ZERO, "=r,r", [q], dtype=tl.int32, is_pure=False, pack=1)
        if HIST == 2:
            if never:  # never runs; makes Triton allocate SMEM_BINS words of shared memory
                tl.inline_asm_elementwise(
                    _RESERVED, "=r,r", [never.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1
                )
                b = tl.arange(0, SMEM_BINS)
                words = tl.load(spare_ptr + b).to(tl.int32)
                tl.store(spare_ptr + b, tl.gather(words, (b * 7) % SMEM_BINS, 0).to(tl.int64))
        tl.debug_barrier()
    return acc


@triton.jit
def hist_add(acc, x, mask, MASKED: tl.constexpr, HIST: tl.constexpr, BINS: tl.constexpr, HIGH: tl.constexpr):
    """Count the bin of every live element of a block of float32 values ``x``: in the low 16
    bits of each word (``HIGH`` False), or in the high 16 bits (``HIGH``: a second quantity
    sharing the words; a program counts at most ``CHUNK`` < 65536 elements, so neither half
    carries into the other)."""
    HIST_BINS: tl.constexpr = BINS.HIST_BINS  # see hist_begin
    if HIST == 1:
        idx = bin_index(x, BINS.SHIFT, BINS.LOW_KEY, BINS.ABOVE, BINS.NONFINITE)
        if MASKED:
            counts = tl.histogram(idx, HIST_BINS, mask=mask)
        else:
            counts = tl.histogram(idx, HIST_BINS)
        if HIGH:
            counts = counts << 16
        acc += counts
    if (HIST == 2 or HIST == 3) and BINS.WINDOW and not MASKED:
        bits = x.to(tl.int32, bitcast=True)
        if HIST == 2 and not HIGH:
            tl.inline_asm_elementwise(
                _WORD_PRE + BINS.WORD_ASM + _SMEM_WORD_POST, "=r,r", [bits], dtype=tl.int32, is_pure=False, pack=1
            )
        if HIST == 2 and HIGH:
            tl.inline_asm_elementwise(
                _WORD_PRE + BINS.WORD_ASM + _SMEM_WORD_POST_HIGH, "=r,r", [bits], dtype=tl.int32, is_pure=False, pack=1
            )
        if HIST == 3 and not HIGH:
            tl.inline_asm_elementwise(
                _WORD_PRE + BINS.WORD_ASM + _PROBE_WORD_POST, "=r,r", [bits], dtype=tl.int32, is_pure=False, pack=1
            )
        if HIST == 3 and HIGH:
            tl.inline_asm_elementwise(
                _WORD_PRE + BINS.WORD_ASM + _PROBE_WORD_POST_HIGH, "=r,r", [bits], dtype=tl.int32, is_pure=False, pack=1
            )
    elif HIST >= 2:
        w = smem_word(x, BINS.SHIFT, BINS.LOW_KEY, BINS.ABOVE, BINS.NONFINITE, BINS.WINDOW)
        if MASKED:  # dead lanes count in the dump word, past every real one
            w = tl.where(mask, w, BINS.DUMP)
        if HIST == 2 and not HIGH:
            tl.inline_asm_elementwise(_SMEM_INC, "=r,r", [w], dtype=tl.int32, is_pure=False, pack=1)
        if HIST == 2 and HIGH:
            tl.inline_asm_elementwise(_SMEM_INC_HIGH, "=r,r", [w], dtype=tl.int32, is_pure=False, pack=1)
        if HIST == 3 and not HIGH:
            tl.inline_asm_elementwise(_PROBE_INC, "=r,r", [w], dtype=tl.int32, is_pure=False, pack=1)
        if HIST == 3 and HIGH:
            tl.inline_asm_elementwise(_PROBE_INC_HIGH, "=r,r", [w], dtype=tl.int32, is_pure=False, pack=1)
        if HIST == 4:
            counts = tl.histogram(w, BINS.SMEM_BINS)
            if HIGH:
                counts = counts << 16
            acc += counts
    return acc


@triton.jit
def _fold(b, BINS: tl.constexpr):
    """The bin of window word ``b``: itself up to ``ABOVE``; finite keys above the range to
    ``ABOVE``, non-finite ones to ``NONFINITE``."""
    return tl.where(b >= (0x7F800000 >> BINS.SHIFT) - BINS.LOW_KEY + 2, BINS.NONFINITE, tl.minimum(b, BINS.ABOVE))


@triton.jit
def _add_pair(row_ptr, bins, counts, live, NUM_BINS: tl.constexpr):
    """Two quantities' counts packed in ``counts`` (:func:`hist_add`): ``row_ptr[bins] +=``
    the low 16 bits, ``(row_ptr + NUM_BINS)[bins] +=`` the high ones, where ``live`` and
    non-zero."""
    low = counts & 0xFFFF
    high = (counts >> 16) & 0xFFFF  # int32: a half of 32,768 or more sets the sign bit
    tl.atomic_add(row_ptr + bins, low.to(tl.int64), mask=live & (low != 0), sem="relaxed")
    tl.atomic_add(row_ptr + NUM_BINS + bins, high.to(tl.int64), mask=live & (high != 0), sem="relaxed")


@triton.jit
def _flush_quads(
    row_ptr,
    start,
    stop,
    FOLD: tl.constexpr,
    CHECK: tl.constexpr,
    HIST: tl.constexpr,
    BINS: tl.constexpr,
    PAIRED: tl.constexpr,
):
    """Add shared words ``4*start .. 4*stop`` to their bins of the row (``FOLD``: words past
    the log bins; ``CHECK``: the range reaches the dump word, which is not added; ``PAIRED``:
    the words' high halves go to the next row)."""
    for s in range(start, stop, BINS.SLAB):
        q = s + tl.arange(0, BINS.SLAB)
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
                bins = _fold(b, BINS)
            if PAIRED:
                _add_pair(row_ptr, bins, words[j], b < BINS.DUMP, BINS.NUM_BINS)
            else:
                if CHECK:
                    live = live & (b < BINS.DUMP)
                tl.atomic_add(row_ptr + bins, words[j].to(tl.int64), mask=live, sem="relaxed")


@triton.jit
def hist_end(acc, row_ptr, HIST: tl.constexpr, BINS: tl.constexpr, PAIRED: tl.constexpr):
    """``row_ptr[bin] += count`` for the non-zero bins of the program (int64 row): from the
    ``tl.histogram`` accumulator, or from the shared words, four per load, the words past
    the log bins folded (``WINDOW``) in a second loop. ``PAIRED``: the counts' high halves
    (:func:`hist_add`'s ``HIGH``) go to the next row, ``row_ptr + NUM_BINS``."""
    HIST_BINS: tl.constexpr = BINS.HIST_BINS  # see hist_begin
    SMEM_BINS: tl.constexpr = BINS.SMEM_BINS
    if HIST == 1:
        b = tl.arange(0, HIST_BINS)
        if PAIRED:
            _add_pair(row_ptr, b, acc, b < BINS.NUM_BINS, BINS.NUM_BINS)
        else:
            tl.atomic_add(row_ptr + b, acc.to(tl.int64), mask=(acc != 0) & (b < BINS.NUM_BINS), sem="relaxed")
    if HIST == 4:  # the interpreter's twin of the shared words
        b = tl.arange(0, SMEM_BINS)
        bins = b
        if BINS.WINDOW:
            bins = _fold(b, BINS)
        if PAIRED:
            _add_pair(row_ptr, bins, acc, b < BINS.DUMP, BINS.NUM_BINS)
        else:
            tl.atomic_add(row_ptr + bins, acc.to(tl.int64), mask=(acc != 0) & (b < BINS.DUMP), sem="relaxed")
    if HIST == 2 or HIST == 3:
        tl.debug_barrier()
        quads = BINS.DUMP // 4 + 1
        plain = quads
        if BINS.WINDOW:
            plain = (BINS.ABOVE // 4) // BINS.SLAB * BINS.SLAB  # whole slabs of words below ABOVE: no fold
        _flush_quads(row_ptr, 0, plain, False, not BINS.WINDOW, HIST, BINS, PAIRED)
        if BINS.WINDOW:
            _flush_quads(row_ptr, plain, quads, True, True, HIST, BINS, PAIRED)


@triton.jit
def _finalize_kernel(
    scratch_ptr,
    rows_ptr,
    step_ptr,
    total_ptr,
    found_inf_ptr,
    NUM_BINS: tl.constexpr,
    STRIDE: tl.constexpr,  # between the scratch rows of consecutive tensors
    FB: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    t = tl.program_id(0)
    b = tl.program_id(1) * FB + tl.arange(0, FB)
    in_row = b < NUM_BINS
    row = tl.load(rows_ptr + t)
    src = scratch_ptr + t.to(tl.int64) * STRIDE + b
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
            f"shl.b32 %fh_b, $1, 1; shr.u32 %fh_k, %fh_b, {self.shift + 1}; "
            f"sub.s32 %fh_k, %fh_k, {self.low_key - 2}; max.s32 %fh_k, %fh_k, 1; min.u32 %fh_k, %fh_k, %fh_b; "
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


class BinLayout(NamedTuple):
    """Every constexpr of the histogram's device code, passed to a kernel as one constexpr
    (``BINS``) and read there by name (``BINS.SHIFT``): the :class:`BinSpec` fields, plus
    ``SLAB`` (one element per thread: the shared histogram is zeroed, read and flushed a quad
    of words per thread at a time, never two threads on one quad) with ``SMEM_BINS`` raised to
    whole slabs of quads."""

    SHIFT: int
    LOW_KEY: int
    ABOVE: int
    NONFINITE: int
    NUM_BINS: int
    HIST_BINS: int
    WINDOW: bool
    DUMP: int
    SMEM_BINS: int
    SLAB: int
    WORD_ASM: str


def bin_layout(bin_kwargs: dict[str, Any], num_warps: int) -> BinLayout:
    """The :class:`BinLayout` of ``bin_kwargs`` (:meth:`BinSpec.kwargs` or :data:`NO_BINS`)
    for programs of ``num_warps`` warps."""
    slab = 32 * num_warps
    return BinLayout(**dict(bin_kwargs, SLAB=slab, SMEM_BINS=max(bin_kwargs["SMEM_BINS"], 4 * slab)))


_STRATEGY: dict = {}


def _compile_shared(kernel: Any, grid: tuple, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The ``HIST_SHARED`` specialisation compiled, not run. Triton's own prints are captured:
    a failing ``ptxas`` prints the whole PTX (tens of thousands of lines) to stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        return kernel.warmup(*args, grid=grid, **dict(kwargs, HIST=HIST_SHARED))


def _why_compile_failed(e: Exception) -> str:
    """One line for a failed compile: the exception's first line and the first three
    distinct ``ptxas`` errors, not the whole log."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = dict.fromkeys(m.group(1).strip() for m in re.finditer(r"; error\s*:\s*([^\n]*)", str(e)))
    detail = "; ".join(list(errors)[:3])
    first = lines[0] if lines else ""
    text = f"{type(e).__name__}: {first}" + (f" ({detail})" if detail else "")
    return text if len(text) <= 240 else text[:237] + "..."


def histogram_strategy(
    kernel: Any, grid: tuple, args: Sequence[Any], kwargs: dict[str, Any], device: torch.device, choice: str = "auto"
) -> int:
    """``HIST_SHARED`` where the compiled kernel passes :func:`shared_histogram_problems`
    (checked once per specialisation, by compiling it before it first runs: the launch
    then reuses that binary), else ``HIST_TL`` with one short warning naming the broken rule
    or the compile error; ``HIST_TL`` whenever ``choice`` is ``"tl"``. On the interpreter
    (no inline PTX there) ``HIST_WORDS``, the shared strategy's twin: the same words and
    fold, counted with ``tl.histogram``."""
    if choice == "tl":
        return HIST_TL
    if device.type != "cuda":
        return HIST_WORDS
    aligned = tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, Tensor))
    # runs every step on the GPU: no sort (a call site builds its kwargs in one order; another
    # order would only cost one more cache entry, checked once)
    key = (kernel, device, aligned, tuple(kwargs.items()))
    choice = _STRATEGY.get(key)
    if choice is None:
        try:
            real = _compile_shared(kernel, grid, args, kwargs)
            problems = shared_histogram_problems(
                real.asm["ptx"], real.asm["ttgir"], real.metadata.shared, kwargs["BINS"].DUMP, kwargs["BINS"].SLAB
            )
        except Exception as e:  # noqa: BLE001 - any compile failure means: not this strategy
            problems = [f"compiling it failed: {_why_compile_failed(e)}"]
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


def scratch_for(target: HistTarget, num_tensors: int) -> Tensor:
    """The call's int64 scratch, zero between calls: ``[num_tensors, num_bins]``, or
    ``[num_tensors, 2, num_bins]`` when ``target`` also tracks staleness (each tensor's
    row of sqrt(v_hat), then its row of staleness: the kernel flushes a program's two
    quantities into consecutive rows)."""
    shape = (num_tensors, target.bins.num_bins)
    if target.staleness is not None:
        shape = (num_tensors, 2, target.bins.num_bins)
    return target.buffer(
        ("fasthist.kernels.scratch", *shape),
        lambda: torch.zeros(shape, dtype=torch.int64, device=target.step.device),
    )


def finalize_histograms(target: HistTarget, scratch: Tensor, found_inf: Tensor | None) -> None:
    """``step[rows[t]] = scratch[t]; total[rows[t]] += scratch[t]; scratch[t] = 0`` for every
    tensor ``t`` of the call (and the same for the staleness windows from the second scratch
    row of each tensor), unless ``found_inf`` is nonzero (then only the zeroing)."""
    n = scratch.shape[0]
    if n == 0:
        return
    windows = [(target.step, target.total)]
    if target.staleness is not None:
        windows.append(target.staleness)
    nb = target.bins.num_bins
    fb = min(1024, triton.next_power_of_2(nb))
    for q, (step, total) in enumerate(windows):
        _finalize_kernel[(n, triton.cdiv(nb, fb))](
            scratch[:, q] if scratch.dim() == 3 else scratch,
            target.rows,
            step,
            total,
            found_inf if found_inf is not None else scratch,
            NUM_BINS=nb,
            STRIDE=scratch.stride(0),
            FB=fb,
            HAS_FOUND_INF=found_inf is not None,
            num_warps=4,
        )
