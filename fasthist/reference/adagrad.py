"""Reference Adagrad step with histograms of the value ε is added to.

The update is ``torch.optim.adagrad.adagrad`` itself, with every flag the group carries
(foreach, fused, sparse gradients, lr_decay, maximize, grad_scale/found_inf, ...), so this
backend is torch's Adagrad bit for bit. torch's denominator is ``sqrt(sum) + eps`` where
``sum`` accumulates ``g*g`` from ``initial_accumulator_value``. Then, per tensor::

    x     = float32(sqrt(sum))                        # the value eps is added to
    hist += bins of x                                 # fasthist.reference.histogram

With sparse gradients the histogram still covers the whole accumulator (rows not touched
by this step keep their value, and still meet ε when they are next updated). A step
skipped through ``found_inf`` (fused, with a GradScaler) leaves both windows untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adagrad import adagrad as torch_adagrad

from ..target import HistTarget
from .histogram import accumulate_

__all__ = ["adagrad_reference"]


def adagrad_reference(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: HistTarget | None = None,
    **kwargs: Any,
) -> None:
    torch_adagrad(params, grads, state_sums, state_steps, **kwargs)
    if hist is None:
        return
    with torch.no_grad():
        values = [v.detach() for v in state_sums]
        accumulate_(hist, values, [1.0] * len(values), kwargs.get("found_inf"))
