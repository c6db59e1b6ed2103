"""What every fused optimizer-plus-histogram kernel shares besides the histogram
(:mod:`._histogram`, whose names are re-exported here): the launch shape, the device helpers
for a chunk and the multi-tensor launch tables. Whether a kernel runs a call is decided by
:mod:`fasthist.dispatch`; a launcher takes what it is given.

- :func:`configure` / :data:`SHAPE`: the launch shape of every kernel (and the histogram
  strategy: ``"auto"`` or ``"tl"``).
- :func:`fused_step_kernel` (``@triton.jit``): the one kernel of every optimizer. A program
  finds its tensor and ``CHUNK`` elements of it (:func:`chunk_header`, :func:`column`), loads
  its loop-invariant values once (the optimizer's ``prepare``), masks everything off on a
  ``found_inf`` step, runs the optimizer's ``update`` on each block of a full chunk (no
  masks: vector :func:`load`/:func:`store`) or of the tail chunk, and histograms the value
  each block returns. An optimizer supplies only its :class:`StepBody`.
- :func:`plan_groups`: per dtype a :class:`TensorTable` (table of ``data_ptr``s and chunk
  descriptors, cached while the tensors do not move) and the contiguous copies of tensors a
  flat walk cannot follow (:func:`write_back` after the launch).
- :func:`launch`: one launch of :func:`fused_step_kernel` per dtype with the histogram
  strategy picked, then the histogram windows (:func:`finalize_histograms`);
  :func:`constexprs`: its constexprs (also for ``bench/sass_report.py`` and the tests'
  compiles).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from fasthist.target import HistTarget

from ._histogram import (  # noqa: F401 - re-exported: the kernels import everything shared from here
    HIST_NAMES,
    HIST_OFF,
    HIST_PROBE,
    HIST_SHARED,
    HIST_TL,
    HIST_WORDS,
    MAX_BINS,
    MAX_WINDOW,
    NO_BINS,
    BinLayout,
    BinSpec,
    bin_index,
    bin_layout,
    finalize_histograms,
    hist_add,
    hist_begin,
    hist_end,
    histogram_strategy,
    scratch_for,
    shared_histogram_problems,
    smem_word,
)

__all__ = [
    "current_histogram_choice",
    "histogram_choice",
    "HIST_OFF",
    "HIST_TL",
    "HIST_SHARED",
    "HIST_PROBE",
    "HIST_WORDS",
    "MAX_BINS",
    "MAX_STALENESS_CHUNK",
    "MAX_WINDOW",
    "NO_BINS",
    "SHAPE",
    "BinLayout",
    "BinSpec",
    "Plan",
    "StepBody",
    "TensorTable",
    "bin_index",
    "bin_layout",
    "check_call",
    "chunk_header",
    "column",
    "configure",
    "constexprs",
    "dense_views",
    "finalize_histograms",
    "fused_step_kernel",
    "hist_add",
    "hist_begin",
    "hist_end",
    "histogram_strategy",
    "launch",
    "launch_options",
    "lerp_coefficients",
    "load",
    "plan_groups",
    "rne",
    "scalar",
    "scratch_for",
    "shared_histogram_problems",
    "smem_word",
    "store",
    "tl_dtype",
    "write_back",
]


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


# Triton's interpreter casts float32 to bfloat16 by truncation; the GPU rounds to nearest
# even (cvt.rn). Under the interpreter rne() rounds in integer arithmetic instead, so CPU
# runs store what the GPU stores.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def rne(x, DTYPE: tl.constexpr):
    """float32 ``x`` in ``DTYPE``, rounded to nearest even (NaN stays NaN), on the GPU and
    under the interpreter alike."""
    if _INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # a NaN's payload must not carry into inf
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def store(base, offs, value, mask, MASKED: tl.constexpr, ALIGNED: tl.constexpr):
    ptrs = _ptrs(base, offs, ALIGNED)
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@triton.jit
def _blocks(
    acc,
    UPDATE: tl.constexpr,
    cols,
    numel,
    k,
    FLAGS: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    MASKED: tl.constexpr,  # False: a full chunk, no masks (vector loads and stores)
    ALIGNED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HIST: tl.constexpr,
    BINS: tl.constexpr,
    STALENESS: tl.constexpr,
):
    """The blocks of one chunk: ``UPDATE`` on each, its value counted into ``acc`` (and, with
    ``STALENESS``, the staleness of each element into the words' high halves)."""
    trips = ITERS
    if MASKED:  # the tail chunk: only its live blocks
        trips = tl.cdiv(numel, BLOCK)
    for it in range(trips):
        offs = it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x, g = UPDATE(cols, offs, mask, k, FLAGS, DTYPE, MASKED, ALIGNED, HAS_GRAD_SCALE)
        if HIST != 0:
            acc = hist_add(acc, x, mask, MASKED, HIST, BINS, False)
            if STALENESS is not None:
                acc = hist_add(acc, STALENESS(x, g, k), mask, MASKED, HIST, BINS, True)
    return acc


@triton.jit
def fused_step_kernel(
    table_ptr,  # int64 [n, 7]: five column pointers (0 the parameter, 1 the grad), numel, slot
    chunk_ptr,  # int64 [num_chunks, 2]: table row, first element
    scratch_ptr,  # int64 [num_slots, NUM_BINS]
    coef_ptr,  # float32 [num_slots, NCOEF]: the optimizer's per-tensor coefficients
    grad_scale_ptr,  # float32 [1] (HAS_GRAD_SCALE)
    found_inf_ptr,  # float32 [1] (HAS_FOUND_INF): nonzero, the step touches nothing
    s0,
    s1,
    s2,
    s3,
    s4,
    s5,
    s6,
    s7,  # the optimizer's scalar hyper-parameters, in the order its PREPARE reads them
    PREPARE: tl.constexpr,  # (coef, scalars, grad_scale, FLAGS) -> k, once per program
    UPDATE: tl.constexpr,  # (cols, offs, mask, k, FLAGS, DTYPE, MASKED, ALIGNED, HAS_GRAD_SCALE) -> (x, g)
    FLAGS: tl.constexpr,  # the optimizer's structural switches (a tuple its bodies read)
    NCOEF: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    ALIGNED: tl.constexpr,  # every tensor of the launch starts 16-byte aligned
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HIST: tl.constexpr,  # HIST_OFF, HIST_TL, HIST_SHARED (HIST_PROBE), HIST_WORDS
    BINS: tl.constexpr,  # BinLayout
    STALENESS: tl.constexpr,  # None, or the optimizer's (x, g, k) -> s: a second histogram
):
    """One program: ``CHUNK`` elements of one tensor stepped by the optimizer's ``UPDATE``
    (which returns the value histogrammed and the gradient as it entered the second moment),
    the histogram flushed once into the tensor's scratch row. With ``STALENESS``, the
    staleness of every element too, counted in the high halves of the same words (at most
    ``CHUNK`` < 65536 per word and program, so the halves never carry into each other) and
    flushed into the tensor's second scratch row."""
    row, start, numel, slot = chunk_header(table_ptr, chunk_ptr, 7, BLOCK * ITERS)
    row_ptr = scratch_ptr + slot * BINS.NUM_BINS  # this program's histogram, zeroed first: fewer live registers
    if STALENESS is not None:  # scratch [n, 2, NUM_BINS]: sqrt(v_hat), then staleness
        row_ptr = scratch_ptr + slot * (2 * BINS.NUM_BINS)
    acc = hist_begin(start < 0, row_ptr, HIST, BINS)
    cols = (
        column(row, 0, start, DTYPE),
        column(row, 1, start, DTYPE),
        column(row, 2, start, DTYPE),
        column(row, 3, start, DTYPE),
        column(row, 4, start, DTYPE),
    )
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    k = PREPARE(coef_ptr + NCOEF * slot, (s0, s1, s2, s3, s4, s5, s6, s7), grad_scale, FLAGS)
    if HAS_FOUND_INF:  # a skipped step touches nothing: every element is masked off
        numel = tl.where(tl.load(found_inf_ptr) == 0, numel, 0)
    if numel == BLOCK * ITERS:  # a full chunk (most of them): no masks
        acc = _blocks(
            acc,
            UPDATE,
            cols,
            numel,
            k,
            FLAGS,
            DTYPE,
            BLOCK,
            ITERS,
            False,
            ALIGNED,
            HAS_GRAD_SCALE,
            HIST,
            BINS,
            STALENESS,
        )
    else:
        acc = _blocks(
            acc,
            UPDATE,
            cols,
            numel,
            k,
            FLAGS,
            DTYPE,
            BLOCK,
            ITERS,
            True,
            ALIGNED,
            HAS_GRAD_SCALE,
            HIST,
            BINS,
            STALENESS,
        )
    if HIST != 0:
        hist_end(acc, row_ptr, HIST, BINS, STALENESS is not None)


class LaunchShape:
    """``block`` elements per inner iteration, ``iters`` iterations per program (``chunk =
    block * iters`` elements of one tensor per program), ``num_warps`` per program, and the
    histogram strategy: ``"auto"`` (shared memory where the compiled kernel passes its
    check, else ``tl.histogram`` with one warning) or ``"tl"`` (always ``tl.histogram``)."""

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


_HISTOGRAM_CHOICES = ("auto", "tl")


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


_THIS_THREAD = threading.local()


@contextlib.contextmanager
def histogram_choice(choice: str) -> Iterator[None]:
    """Within the block, this thread's launches use the histogram strategy ``choice``
    (``"auto"`` or ``"tl"``) whatever :func:`configure` set; other threads' launches are not
    affected (the self-test's ``tl`` retry and the specialisations it sends to ``tl``)."""
    if choice not in _HISTOGRAM_CHOICES:
        raise ValueError(f"Invalid histogram: {choice!r}; expected one of {', '.join(_HISTOGRAM_CHOICES)}")
    previous = getattr(_THIS_THREAD, "histogram", None)
    _THIS_THREAD.histogram = choice
    try:
        yield
    finally:
        _THIS_THREAD.histogram = previous


def current_histogram_choice() -> str:
    """The histogram strategy this thread's next launch asks for: :func:`histogram_choice`'s
    within its block, else the configured ``SHAPE.histogram``."""
    return getattr(_THIS_THREAD, "histogram", None) or SHAPE.histogram


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


def check_call(op: str, n: int, lists: dict[str, Sequence], device: torch.device, hist: HistTarget | None) -> None:
    """Every list of a call holds ``n`` entries, and the histograms live on the parameters' device
    (the staleness windows, when given, shaped like ``step``)."""
    for name, lst in lists.items():
        if len(lst) != n:
            raise RuntimeError(f"fasthist {op}: expected {n} {name}, but got {len(lst)}")
    if hist is not None and hist.step.device != device:
        raise RuntimeError(f"fasthist {op}: histograms on {hist.step.device}, but parameters on {device}")
    for w in hist.staleness if hist is not None and hist.staleness is not None else ():
        if w.device != device or w.shape != hist.step.shape or w.dtype != hist.step.dtype:
            raise RuntimeError(
                f"fasthist {op}: staleness windows must be {hist.step.dtype} {tuple(hist.step.shape)} on {device} "
                f"like the step window, but got {w.dtype} {tuple(w.shape)} on {w.device}"
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


class StepBody(NamedTuple):
    """An optimizer's part of :func:`fused_step_kernel`: ``prepare(coef, scalars, grad_scale,
    FLAGS)`` (``@triton.jit``) returns the program's loop-invariant values ``k`` (its tensor's
    ``ncoef`` coefficients, its scalars), once per program; ``update(cols, offs, mask, k,
    FLAGS, DTYPE, MASKED, ALIGNED, HAS_GRAD_SCALE)`` (``@triton.jit``) steps one block of the
    five columns in place and returns ``(x, g)``: the float32 value histogrammed, and the
    float32 gradient as it entered the second moment; ``flags``, the NamedTuple of its
    structural switches (``FLAGS``); ``staleness(x, g, k)`` (``@triton.jit``), the float32
    staleness of each element, histogrammed beside ``x`` when the call asks for it (None: the
    optimizer defines none, and its launcher refuses such calls)."""

    prepare: Any
    update: Any
    flags: type
    ncoef: int
    staleness: Any = None


def constexprs(
    body: StepBody,
    flags: tuple,
    dtype: Any,
    bins: BinLayout,
    *,
    aligned: bool = True,
    hist: int = HIST_OFF,
    grad_scale: bool = False,
    found_inf: bool = False,
    staleness: bool = False,
) -> dict[str, Any]:
    """The constexprs of :func:`fused_step_kernel` for ``body`` with its ``flags``, on
    ``dtype`` (a torch or Triton dtype) with the current launch shape; ``staleness``: the
    specialisation that also histograms ``body.staleness``."""
    if staleness and body.staleness is None:
        raise ValueError("Invalid staleness: this optimizer's kernel defines no staleness to histogram")
    return {
        "PREPARE": body.prepare,
        "UPDATE": body.update,
        "FLAGS": flags,
        "NCOEF": body.ncoef,
        "DTYPE": dtype if isinstance(dtype, tl.dtype) else tl_dtype(dtype),
        "BLOCK": SHAPE.block,
        "ITERS": SHAPE.iters,
        "ALIGNED": aligned,
        "HAS_GRAD_SCALE": grad_scale,
        "HAS_FOUND_INF": found_inf,
        "HIST": hist,
        "BINS": bins,
        "STALENESS": body.staleness if staleness else None,
    }


_SCALARS = 8  # s0 .. s7 of fused_step_kernel


#: Largest chunk (elements per program) of a launch that also histograms staleness: the two
#: quantities share each word of a program's histogram, one 16-bit half each.
MAX_STALENESS_CHUNK = (1 << 16) - 1


def launch(
    body: StepBody,
    flags: tuple,
    plan: Plan,
    hist: HistTarget | None,
    device: torch.device,
    *,
    scalars: Sequence[float] = (),
    coef: Tensor | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One launch of :func:`fused_step_kernel` with ``body`` per dtype group of ``plan``, the
    histogram strategy picked, then the histogram windows (:func:`finalize_histograms`) and
    the write-back of working copies. ``coef`` (float32 ``[n, body.ncoef]``; ``ncoef`` 0: one
    row every program reads), ``grad_scale`` and ``found_inf`` (0-d float32 on ``device``, or
    None) are the dispatcher's ready inputs (:mod:`fasthist.backend`). ``hist.staleness``
    not None: the launch also histograms ``body.staleness`` into those windows (ValueError
    where the body defines none, or where a program's chunk exceeds :data:`MAX_STALENESS_CHUNK`)."""
    if len(scalars) > _SCALARS:
        raise ValueError(f"Invalid scalars: {len(scalars)}; expected at most {_SCALARS}")
    staleness = hist is not None and hist.staleness is not None
    if staleness and body.staleness is None:
        raise ValueError("Invalid hist.staleness: this optimizer's kernel histograms no staleness; expected None")
    if staleness and SHAPE.chunk > MAX_STALENESS_CHUNK:
        raise ValueError(
            f"Invalid launch shape for staleness: chunk {SHAPE.chunk}; expected at most {MAX_STALENESS_CHUNK} "
            "elements per program (both quantities count in 16-bit halves of one word)"
        )
    values = tuple(float(x) for x in scalars) + (0.0,) * (_SCALARS - len(scalars))
    num_tensors = sum(tables.table.shape[0] for _, tables, _ in plan.groups)
    scratch = scratch_for(hist, num_tensors) if hist is not None else None
    bins = bin_layout(BinSpec(hist.bins).kwargs() if hist is not None else NO_BINS, SHAPE.num_warps)
    used: set[int] = set()
    for dtype, tables, aligned in plan.groups:
        if tables.num_chunks == 0:
            continue
        grid = (tables.num_chunks,)
        spare = tables.table  # stands for every pointer the launch does not read
        call_args = (
            tables.table,
            tables.chunks,
            scratch if scratch is not None else spare,
            coef if coef is not None else spare,
            grad_scale if grad_scale is not None else spare,
            found_inf if found_inf is not None else spare,
            *values,
        )
        kw = dict(
            constexprs(
                body,
                flags,
                dtype,
                bins,
                aligned=aligned,
                grad_scale=grad_scale is not None,
                found_inf=found_inf is not None,
                staleness=staleness,
            ),
            num_warps=SHAPE.num_warps,
            **launch_options(device),
        )
        if hist is not None:
            kw["HIST"] = histogram_strategy(fused_step_kernel, grid, call_args, kw, device, current_histogram_choice())
            used.add(kw["HIST"])
        fused_step_kernel[grid](*call_args, **kw)
    if hist is not None:
        hist.marks[HistTarget.STRATEGY] = "+".join(sorted(HIST_NAMES[h] for h in used))
        finalize_histograms(hist, scratch, found_inf)
    write_back(plan, grads_written=grad_scale is not None)
