"""Where a backend call writes its histograms, shared by every backend.

A :class:`HistTarget` names rows of the optimizer's packed ``[R, num_bins]`` int64
buffers (see :mod:`fasthist.store`): ``rows[i]`` is the row of the i-th tensor of the
call, ``step`` and ``total`` are the two windows. A backend writes ``step[rows[i]]`` and
adds to ``total[rows[i]]``; what it needs between calls (workspace, scratch) it keeps in
the target with :meth:`HistTarget.buffer`, so a target lives as long as the set of
parameters it was built for and allocates nothing after the first step.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .bins import LogBins

__all__ = ["HistTarget", "DeviceTargets"]


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
    # the buffers of buffer(); read through buffer() (kernels/_common.py still reads it directly)
    _workspace: dict = field(default_factory=dict, repr=False)
    # what a backend keeps about this very target between calls, unlike the workspace never
    # shared with another HistTarget (fasthist.csrc: each step row's span and the step
    # buffer's version after writing them); keyed like buffer()
    marks: dict = field(default_factory=dict, repr=False, compare=False)
    # names this target inside a compiled graph (fasthist.compiled), where no object can go
    key: int = field(default_factory=lambda: next(_KEYS), repr=False, compare=False)

    def __post_init__(self) -> None:
        _LIVE[self.key] = self

    @staticmethod
    def live(key: int) -> HistTarget | None:
        """The target whose ``key`` this is, while it exists."""
        return _LIVE.get(key)

    def over(self, step: Tensor, total: Tensor, rows: Tensor) -> HistTarget:
        """A target over these windows and rows that shares this one's workspace (not its
        marks): what a compiled step's opaque call rebuilds around the windows it is given."""
        return HistTarget(self.bins, step, total, rows, self._workspace)

    def buffer(self, key: Hashable, make: Callable[[], Tensor]) -> Tensor:
        """The tensor kept under ``key``, made by ``make()`` on first use. Keys are the
        caller's (name them after the module, e.g. ``("fasthist.kernels.scratch", n)``);
        big CPU allocations page-fault every step, so backends keep theirs here."""
        buf = self._workspace.get(key)
        if buf is None:
            buf = self._workspace[key] = make()
        return buf


_KEYS = itertools.count()
_LIVE: weakref.WeakValueDictionary[int, HistTarget] = weakref.WeakValueDictionary()

DeviceTargets = dict[torch.device, tuple[list[int], HistTarget]]
"""What a step passes to a functional form as ``hist``: per device, (the indices of the
call's tensors on it, their target)."""
