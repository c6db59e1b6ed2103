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

from torch import Tensor
from torch.optim.adagrad import adagrad as torch_adagrad

from ..declaration import HistInputs
from . import reference_step

__all__ = ["adagrad_hist_inputs", "adagrad_reference"]


def adagrad_hist_inputs(lists: list[list[Tensor]], kwargs: dict[str, Any]) -> HistInputs:
    """After the update: the accumulators (their square roots meet ``eps``), scale 1, ``found_inf``."""
    values = [v.detach() for v in lists[2]]
    return values, [1.0] * len(values), kwargs.get("found_inf")


#: ``torch.optim.adagrad.adagrad`` (same keyword arguments), then the histogram pass in torch ops.
adagrad_reference = reference_step(torch_adagrad, adagrad_hist_inputs)
