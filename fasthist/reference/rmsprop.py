"""Reference RMSprop step with histograms of the value ε is added to.

The update is ``torch.optim.rmsprop.rmsprop`` itself, with every flag the group carries
(foreach, capturable, differentiable, maximize, ...), so this backend is torch's RMSprop
bit for bit. torch's denominator is ``sqrt(v) + eps`` with no bias correction, where::

    v = square_avg                                   # plain
    v = square_avg - grad_avg * grad_avg             # centered (torch.addcmul, value=-1)

Then, per tensor::

    x     = float32(sqrt(v))                          # the value eps is added to
    hist += bins of x                                 # fasthist.reference.histogram

A centered ``v`` can round below zero; torch's denominator is then NaN, and so is ``x``:
it is counted in the non-finite bin, not hidden.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.rmsprop import rmsprop as torch_rmsprop

from ..declaration import HistInputs
from . import reference_step

__all__ = ["rmsprop_hist_inputs", "rmsprop_reference", "rmsprop_denominator_squares"]


def rmsprop_denominator_squares(square_avgs: list[Tensor], grad_avgs: list[Tensor], centered: bool) -> list[Tensor]:
    """The tensors whose square roots torch adds ``eps`` to (new tensors when centered).
    Complex states are viewed as real first, as torch does: per component, not ``z*z``."""
    if not centered:
        return square_avgs
    sq = [torch.view_as_real(v) if v.is_complex() else v for v in square_avgs]
    ga = [torch.view_as_real(v) if v.is_complex() else v for v in grad_avgs]
    return torch._foreach_addcmul(sq, ga, ga, value=-1)


def rmsprop_hist_inputs(lists: list[list[Tensor]], kwargs: dict[str, Any]) -> HistInputs:
    """After the update: the tensors whose square roots torch adds ``eps`` to, scale 1."""
    square_avgs, grad_avgs = lists[2], lists[3]
    sq = [v.detach() for v in square_avgs]
    ga = [v.detach() for v in grad_avgs]
    values = rmsprop_denominator_squares(sq, ga, bool(kwargs.get("centered")))
    return values, [1.0] * len(values), None


#: ``torch.optim.rmsprop.rmsprop`` (same keyword arguments), then the histogram pass in torch ops.
rmsprop_reference = reference_step(torch_rmsprop, rmsprop_hist_inputs)
