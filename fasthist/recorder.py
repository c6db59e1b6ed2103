"""Per-tensor quantiles of a fasthist optimizer's histograms over training, with no host
sync while training runs.

:class:`QuantileRecorder` hooks ``optimizer.step()``; every ``every``-th step it computes
the quantiles ``qs`` of every tracked tensor's histogram in one batched device operation
and writes them into a preallocated device buffer ``[capacity, tensors, len(qs)]`` (a
ring: past ``capacity`` records the oldest are overwritten). The quantile ranks, bin
values and the buffer all live on the histograms' device, so a record launches a few
kernels and copies nothing to the host; :meth:`QuantileRecorder.trace` reads everything
back once.

The quantile rule is the library's one rule, the ε-range rule's (:mod:`fasthist.histogram`):
with ``exclude_zeros`` (default) the exact zeros are dropped and ``a[min(floor(q*n), n-1)]``
is read, so the
recorded 2% and 98% points are the per-tensor bounds the rule would take at that step,
each within the bins' relative accuracy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .histogram import as_quantiles, batched_quantile, int_arg
from .wrapped import unwrap

__all__ = ["QuantileRecorder", "QuantileTrace"]


@dataclass(frozen=True)
class QuantileTrace:
    """Recorded quantiles: ``values[t, i, j]`` is quantile ``qs[j]`` of tensor ``names[i]``
    after optimizer step ``steps[t]`` (steps counted from 1 since the recorder started).
    NaN where a tensor had no (nonzero) value."""

    steps: np.ndarray
    names: list[str]
    qs: list[float]
    values: np.ndarray

    def to_dict(self) -> dict:
        return {
            "steps": self.steps.tolist(),
            "names": list(self.names),
            "qs": list(self.qs),
            "values": [[[None if np.isnan(x) else float(x) for x in row] for row in t] for t in self.values],
        }


class QuantileRecorder:
    """Record per-tensor quantiles of ``opt``'s histograms every ``every`` steps.

    Args:
        opt: a fasthist optimizer (any declared in :mod:`fasthist.catalog`).
        qs: the quantiles (default 2%, 50%, 98%).
        every: record after every ``every``-th ``opt.step()`` (default 1).
        capacity: how many records the device buffer holds; later records overwrite the
            oldest (``dropped`` counts them).
        window: ``"step"`` (the latest update, default) or ``"total"``.
        exclude_zeros: drop exact zeros first, as the ε-range rule does (default True).

    Use as a context manager or call :meth:`close` to remove the hook. :meth:`record`
    records now, by hand, whatever the step count.
    """

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        qs: Sequence[float] | Tensor = (0.02, 0.5, 0.98),
        *,
        every: int = 1,
        capacity: int = 1024,
        window: str = "step",
        exclude_zeros: bool = True,
    ) -> None:
        opt = unwrap(opt)  # a framework's wrapper (Accelerate, Lightning, ...) is fine too
        every = int_arg(every, "every", 1)
        capacity = int_arg(capacity, "capacity", 1)
        if window not in ("step", "total"):
            raise ValueError(f"Invalid window: {window!r}; expected 'step' or 'total'")
        self.opt = opt
        self._q, _ = as_quantiles(qs)
        self.qs = self._q.tolist()
        self.every = every
        self.capacity = capacity
        self.window = window
        self.exclude_zeros = exclude_zeros
        self._calls = 0
        self._records = 0
        self._steps: deque[int] = deque(maxlen=capacity)
        self._names: list[str] | None = None
        self._buffer: Tensor | None = None
        self._q_dev: Tensor | None = None
        self._columns: dict[tuple[str, ...], Tensor] = {}
        self._handle = opt.register_step_post_hook(self._hook)

    # -- recording -----------------------------------------------------------------------
    def _hook(self, opt: Any, args: Any, kwargs: Any) -> None:
        self._calls += 1
        if self._calls % self.every == 0:
            self._record(self._calls)

    def record(self) -> None:
        """Record the quantiles now (labelled with the number of steps seen so far)."""
        self._record(self._calls)

    def _record(self, step: int) -> None:
        names, _, counts = self.opt.histogram_rows(self.window)  # type: ignore[attr-defined]
        if counts is None:
            return
        device = counts.device
        if self._buffer is None:
            self._names = []
            self._buffer = torch.full(
                (self.capacity, 0, len(self.qs)), float("nan"), dtype=torch.float32, device=device
            )
            self._q_dev = self._q.to(device)  # kept on the device: a copy per record would synchronise
        if tuple(names) not in self._columns:
            self._grow(names)
        values = batched_quantile(counts, self._q_dev, self.opt.bins, exclude_zeros=self.exclude_zeros)  # type: ignore[arg-type, attr-defined]
        slot = self._buffer[self._records % self.capacity]
        slot.fill_(float("nan"))
        slot.index_copy_(0, self._columns[tuple(names)], values.to(torch.float32))
        self._records += 1
        self._steps.append(step)

    def _grow(self, names: Sequence[str]) -> None:
        """Tensors that start being tracked later (no gradient at first, a param group added
        mid-run) get a new column, NaN before they appear; the recording goes on."""
        assert self._buffer is not None and self._names is not None
        new = [n for n in names if n not in self._names]
        if new:
            pad = self._buffer.new_full((self.capacity, len(new), len(self.qs)), float("nan"))
            self._buffer = torch.cat([self._buffer, pad], dim=1)
            self._names = self._names + new
        key = tuple(names)
        if key not in self._columns:
            pos = {n: i for i, n in enumerate(self._names)}
            self._columns[key] = torch.tensor([pos[n] for n in names], dtype=torch.int64).to(self._buffer.device)

    # -- reading -------------------------------------------------------------------------
    @property
    def dropped(self) -> int:
        """Records overwritten because more than ``capacity`` were taken."""
        return max(0, self._records - self.capacity)

    def trace(self) -> QuantileTrace:
        """Everything recorded so far, oldest first (one device-to-host copy)."""
        qs = list(self.qs)
        if self._buffer is None:
            return QuantileTrace(np.zeros(0, dtype=np.int64), [], qs, np.zeros((0, 0, len(qs))))
        kept = min(self._records, self.capacity)
        data = self._buffer.cpu().numpy().astype(np.float64)
        if self._records > self.capacity:
            start = self._records % self.capacity
            data = np.concatenate([data[start:], data[:start]])
        steps = np.asarray(list(self._steps), dtype=np.int64)
        return QuantileTrace(steps, list(self._names or []), qs, data[:kept])

    def close(self) -> None:
        """Stop recording (the recorded values stay readable)."""
        self._handle.remove()

    def __enter__(self) -> QuantileRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
