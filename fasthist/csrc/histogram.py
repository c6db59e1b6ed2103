"""The compiled CPU histogram pass (``histogram.cpp``): the bins of the reference's
:func:`fasthist.reference.histogram.accumulate_` on CPU tensors, the backend
:data:`fasthist.backend.CPU_HISTOGRAM`. It bins exactly what the torch-op path bins (IEEE square root and division, the
LogBins bit layout) in one parallel sweep, and writes both windows itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..declaration import HistInputs
from ..target import HistTarget
from .library import enabled, load

__all__ = ["histogram_"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TAKES = frozenset(_DTYPES + (torch.complex64, torch.complex32))  # complex: binned as (re, im) pairs
# HistTarget.marks: (spans int32 [n, 2], the step buffer's version after writing them, or
# None where it has no version counter)
_SPANS = "fasthist.csrc.spans"


def histogram_(target: HistTarget, inputs: HistInputs, *, sqrt: bool = True, reciprocal: bool = False) -> bool:
    """:func:`fasthist.reference.histogram.accumulate_` of ``inputs`` (``values, scale,
    found_inf`` as a declaration's ``hist_inputs`` returns them) on CPU tensors, if this
    kernel can take the call: returns False (having done nothing) when it is off or
    unavailable, or for tensors it does not bin (float64: the torch-op path rounds those)."""
    values, scale, found_inf = inputs
    if not enabled() or target.step.device.type != "cpu":
        return False
    if not all(v.dtype in _TAKES and v.is_cpu for v in values):
        return False
    if not all(w.dtype == torch.int64 and w.dim() == 2 and w.stride(1) == 1 for w in (target.step, target.total)):
        return False
    ops = load()
    if ops is None:
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
        ops.histogram_(
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
        target.marks[_SPANS] = (spans, _version(target.step))
    return True


def _version(t: Tensor) -> int | None:
    """``t``'s version counter, or None for an inference tensor (made under
    ``torch.inference_mode()``), which has none: its spans are then never trusted."""
    return None if t.is_inference() else t._version


def _spans(target: HistTarget, n: int) -> tuple[Tensor | None, bool]:
    """The target's spans (int32 [n, 2], see ``Windows`` in ``windows.h``) and whether they
    can be trusted: the step buffer's version counter is the one recorded right after this
    op last wrote it, so nothing wrote a step row since. Every torch op on the buffer or a
    view of it (what ``opt.histogram_rows()`` returns is one), and every op of this library, bumps
    the counter; writes through ``.data``, ``.numpy()`` or raw pointers are not seen (see
    :mod:`fasthist.store`), and fasthist makes none on the CPU. An inference tensor has no
    counter, so its spans are never trusted, nor are any under ``torch.compile`` (a host
    read of a version would be guarded): every step row is then cleared in full."""
    if torch.compiler.is_compiling():
        return None, False
    # in marks, not the workspace: a HistTarget rebuilt around the same workspace (a compiled
    # step's opaque call) must not see, nor overwrite, the spans of this one
    spans, version = target.marks.get(_SPANS, (None, None))
    if spans is None or spans.shape[0] != n:
        return torch.empty(n, 2, dtype=torch.int32), False
    return spans, version is not None and version == _version(target.step)
