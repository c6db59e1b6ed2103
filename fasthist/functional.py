"""Functional forms of the fasthist optimizers: the optimizer math plus histogram
accumulation, dispatched per device to a backend (see :mod:`fasthist.backend`).

``hist`` maps each device to ``(indices of the tensors on it, HistTarget)``, as
``HistogramMixin._hist_targets`` builds it; ``None`` records nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .backend import kernels_module, select_backend
from .reference.adam import adam_reference
from .reference.histogram import HistTarget

__all__ = ["adam"]


def _split(lists: list[list[Tensor]], idx: list[int]) -> list[list[Tensor]]:
    return [[lst[i] for i in idx] if lst else lst for lst in lists]


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: dict[torch.device, tuple[list[int], HistTarget]] | None = None,
    **kwargs: Any,
) -> None:
    """``torch.optim.adam.adam`` (same keyword arguments) plus histograms of sqrt(v_hat)."""
    if not params:
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
    if hist is None:
        groups = {}
        for i, p in enumerate(params):
            groups.setdefault(p.device, []).append(i)
        calls = [(dev, idx, None) for dev, idx in groups.items()]
    else:
        calls = [(dev, idx, target) for dev, (idx, target) in hist.items()]
    whole = len(calls) == 1
    for device, idx, target in calls:
        sub = lists if whole else _split(lists, idx)
        if select_backend(device) == "triton":
            kernels_module().adam.adam_hist(*sub, hist=target, **kwargs)  # type: ignore[union-attr]
        else:
            adam_reference(*sub, hist=target, **kwargs)
