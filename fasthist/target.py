"""Where a backend call writes its histograms, shared by every backend.

A :class:`HistTarget` names rows of the optimizer's packed ``[R, num_bins]`` int64
buffers (see :mod:`fasthist.store`): ``rows[i]`` is the row of the i-th tensor of the
call, ``step`` and ``total`` are the two windows. A backend writes ``step[rows[i]]`` and
adds to ``total[rows[i]]``; what it needs between calls (workspace, scratch) it keeps in
the target with :meth:`HistTarget.buffer`, so a target lives as long as the set of
parameters it was built for and allocates nothing after the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .bins import LogBins

__all__ = ["HistTarget", "DeviceTargets"]


@dataclass
class HistTarget:
    """Where one backend call writes its histograms: rows of packed [R, num_bins] buffers.

    ``rows[i]`` is the row of the i-th tensor of the call; ``step``/``total`` are the
    "step" and "total" windows. All on one device.

    ``staleness``: None, or the (step, total) windows of the second quantity, the staleness
    ``|g| / max(x, eps)`` (:mod:`fasthist.health`, :mod:`fasthist.reference.staleness`):
    packed int64 ``[R, num_bins]`` buffers indexed by the same ``rows``, binned with the same
    ``bins``. A backend given a target with ``staleness`` set writes both quantities.
    """

    bins: LogBins
    step: Tensor
    total: Tensor
    rows: Tensor
    #: the (step, total) windows of staleness, packed [R, num_bins] int64 like ``step``/``total``
    #: and indexed by the same ``rows``; None when the call does not track it
    staleness: tuple[Tensor, Tensor] | None = None
    # the buffers of buffer(), read through it
    _workspace: dict = field(default_factory=dict, repr=False)
    # what a backend keeps about this very target between calls, unlike the workspace never
    # shared with another HistTarget (fasthist.csrc: each step row's span and the step
    # buffer's version after writing them); keyed like buffer()
    marks: dict = field(default_factory=dict, repr=False, compare=False)
    #: key of ``marks`` under which the Triton backend leaves the histogram strategy its last
    #: launch used ("shared", "tl.histogram" or "words", joined by "+" when dtypes differed)
    STRATEGY: ClassVar[str] = "fasthist.histogram_strategy"

    def buffer(self, key: Hashable, make: Callable[[], Tensor]) -> Tensor:
        """The tensor kept under ``key``, made by ``make()`` on first use. Keys are the
        caller's (name them after the module, e.g. ``("fasthist.kernels.scratch", n)``);
        big CPU allocations page-fault every step, so backends keep theirs here."""
        buf = self._workspace.get(key)
        if buf is None:
            buf = self._workspace[key] = make()
        return buf


DeviceTargets = dict[torch.device, tuple[list[int], HistTarget]]
"""What a step passes to a functional form as ``hist``: per device, (the indices of the
call's tensors on it, their target)."""
