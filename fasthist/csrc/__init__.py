"""The compiled CPU passes: the histogram pass (``histogram.cpp``), what the reference's
:func:`fasthist.reference.histogram.accumulate_` runs on CPU tensors when it is available,
and the fused tracked steps (``fused_adam.cpp``): what ``fused=True`` runs on CPU tensors
(:func:`fused_step_`); :mod:`fasthist.dispatch` decides when each runs.

It bins exactly what the torch-op path bins (IEEE square root and division, the LogBins
bit layout) in one parallel sweep, and writes both windows itself. The library is, in
order: the one a ``setup.py`` build put beside the package (installed with torch in the
build environment, ``pip install --no-build-isolation``), else one compiled on first use
into a cache (``$FASTHIST_CACHE``, default ``~/.cache/fasthist``; one compiler call, about
10 s). Where neither works, the torch-op path runs, with one warning saying why.
``FASTHIST_CPU_KERNEL=0`` turns it off (the torch-op path is then the histogram, as it is
the oracle in the tests).
"""

from __future__ import annotations

import glob
import os
import threading
import warnings
from typing import Any

import torch
from torch import Tensor

from ..target import HistTarget
from . import build as _build

__all__ = ["available", "enabled", "fused_step_", "histogram_", "library_path"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TAKES = frozenset(_DTYPES + (torch.complex64, torch.complex32))  # complex: binned as (re, im) pairs
_SPANS = "fasthist.csrc.spans"  # HistTarget.marks: (spans int32 [n, 2], step version after writing them)
_lock = threading.Lock()
_op: Any = None
_path: str | None = None
_error: str | None = None


def enabled() -> bool:
    """False when ``FASTHIST_CPU_KERNEL`` is ``0`` (read at every step, so tests can flip it)."""
    return os.environ.get("FASTHIST_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def _installed() -> str | None:
    """The library a setup.py build put beside the package, if any."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(package, f"{_build.NAME}.*so")))
    return found[0] if found else None


def _cache_dir() -> str:
    root = os.environ.get("FASTHIST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fasthist"
    )
    return os.path.join(root, "cpu")


def _load() -> Any:
    """``torch.ops.fasthist.histogram_``, loading (or building) the library once per
    process; None, with one warning, when that fails."""
    global _op, _path, _error
    if _op is not None or _error is not None:
        return _op
    with _lock:
        if _op is None and _error is None:
            try:
                path = _installed() or _build.build(_cache_dir())
                torch.ops.load_library(path)
                _register_fake()
                _op, _path = torch.ops.fasthist.histogram_, path
            except Exception as e:  # no compiler, a failed build, a library that does not load
                _error = f"{type(e).__name__}: {e}"
                warnings.warn(
                    "fasthist: the compiled CPU histogram is unavailable, so CPU steps histogram with "
                    f"torch ops (slower; set FASTHIST_CPU_KERNEL=0 to silence this). Reason: {_error}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _op


def _register_fake() -> None:
    """A fake (meta) kernel, so torch.compile can trace a step that calls the op: it only
    writes its two int64 windows in place, and returns nothing."""
    if getattr(torch.library, "register_fake", None) is None:  # torch < 2.4: no compile support
        return

    @torch.library.register_fake("fasthist::histogram_")
    def _fake(
        values,
        scale,
        found_inf,
        sqrt,
        reciprocal,
        shift,
        low_key,
        num_log_bins,
        rows,
        step,
        total,
        spans=None,
        spans_valid=False,
    ):
        return None

    @torch.library.register_fake("fasthist::fused_adam_hist_")
    def _fake_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs):
        return None  # updates its tensors and windows in place

    @torch.library.register_fake("fasthist::fused_adagrad_hist_")
    def _fake_adagrad(params, grads, state_sums, state_steps, **kwargs):
        return None  # updates its tensors and windows in place


def available() -> bool:
    """Whether the compiled kernel is loaded (building it on first call if needed)."""
    return _load() is not None


def library_path() -> str | None:
    """Path of the loaded library, or None."""
    _load()
    return _path


def histogram_(
    target: HistTarget,
    values: list[Tensor],
    scale: list[float] | Tensor,
    found_inf: Tensor | None = None,
    *,
    sqrt: bool = True,
    reciprocal: bool = False,
) -> bool:
    """:func:`fasthist.reference.histogram.accumulate_` on CPU tensors, if this kernel can
    take the call: returns False (having done nothing) when it is off or unavailable, or for
    tensors it does not bin (float64: the torch-op path rounds those)."""
    if not enabled() or target.step.device.type != "cpu":
        return False
    if not all(v.dtype in _TAKES and v.is_cpu for v in values):
        return False
    if not all(w.dtype == torch.int64 and w.dim() == 2 and w.stride(1) == 1 for w in (target.step, target.total)):
        return False
    op = _load()
    if op is None:
        return False
    # one float32 scale per tensor (float32(c), rounded to nearest as the reference divides by
    # it), and found_inf, go in as CPU tensors: no host value, so torch.compile traces one graph
    if isinstance(scale, Tensor):
        scale = scale.to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
    else:
        scale = torch.tensor([float(c) for c in scale], dtype=torch.float32)
    if found_inf is not None:
        found_inf = found_inf.to("cpu").reshape(())
    spans, valid = _spans(target, len(values))
    bins = target.bins
    with torch.no_grad():
        # values as they are: the op reads complex ones as (re, im) and copies non-contiguous ones
        op(
            values,
            scale,
            found_inf,
            sqrt,
            reciprocal,
            bins.shift,
            bins.low_key,
            bins.num_log_bins,
            target.rows,
            target.step,
            target.total,
            spans,
            valid,
        )
    if spans is not None:
        target.marks[_SPANS] = (spans, target.step._version)
    return True


def _spans(target: HistTarget, n: int) -> tuple[Tensor | None, bool]:
    """The target's spans (int32 [n, 2], see ``Windows`` in ``private_hist.h``) and
    whether it can be trusted: the step buffer's version counter is the one recorded right
    after this op last wrote it, so nothing wrote a step row since (every torch op on the
    buffer or a view of it, and every op of this library, bumps the counter; writes through
    ``.data``, numpy or raw pointers are not seen, and fasthist makes none on the CPU).
    Under ``torch.compile`` none (a host read of a version would be guarded): every step
    row is cleared in full, as without spans."""
    if torch.compiler.is_compiling():
        return None, False
    # in marks, not the workspace: a HistTarget rebuilt around the same workspace (a compiled
    # step's opaque call) must not see, nor overwrite, the spans of this one
    spans, version = target.marks.get(_SPANS, (None, None))
    if spans is None or spans.shape[0] != n:
        return torch.empty(n, 2, dtype=torch.int32), False
    return spans, version == target.step._version


from .fused import fused_step_  # noqa: E402 - needs _load and enabled above
