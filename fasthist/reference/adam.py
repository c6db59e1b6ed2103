"""Reference Adam/AdamW step with histograms of sqrt(v_hat).

The update is ``torch.optim.adam.adam`` itself, with every flag the group carries
(foreach, fused, capturable, differentiable, grad_scale/found_inf, ...), so this backend
is torch's Adam bit for bit. Then, per tensor::

    v      = max_exp_avg_sq if amsgrad else exp_avg_sq       # what the denominator uses
    c      = sqrt(1 - beta2**step)                           # bias_correction2_sqrt
    x      = float32(sqrt(v)) / float32(c)                   # the value eps is added to
    hist  += bins of x                                       # fasthist.reference.histogram

``c`` is computed as torch computes it: on the host in float64 when the step counts are
on the CPU, else on the device in float32 (capturable/fused), so no host sync is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

from ..target import HistTarget
from .histogram import accumulate_

__all__ = ["adam_reference", "bias_correction2_sqrt"]


def bias_correction2_sqrt(state_steps: list[Tensor], beta2: float | Tensor) -> list[float] | Tensor:
    """``sqrt(1 - beta2**step)`` per tensor, after the step counter was incremented."""
    if all(s.device.type == "cpu" for s in state_steps):
        b2 = float(beta2)
        return [(1 - b2 ** float(s)) ** 0.5 for s in state_steps]
    steps = torch.stack([s.reshape(()) for s in state_steps]).to(torch.float32)
    if isinstance(beta2, Tensor):
        beta2 = beta2.to(device=steps.device, dtype=torch.float32)
    return (1 - torch.pow(beta2, steps)).sqrt()


def adam_reference(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: HistTarget | None = None,
    **kwargs: Any,
) -> None:
    torch_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)
    if hist is None:
        return
    with torch.no_grad():
        values = max_exp_avg_sqs if kwargs.get("amsgrad") else exp_avg_sqs
        scale = bias_correction2_sqrt(state_steps, kwargs["beta2"])
        if isinstance(scale, Tensor):
            scale = scale.to(hist.step.device)
        accumulate_(hist, [v.detach() for v in values], scale, kwargs.get("found_inf"))
