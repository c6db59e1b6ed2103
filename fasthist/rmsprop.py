r"""``fasthist.RMSprop``: ``torch.optim.RMSprop`` that also histograms, at every step and
per parameter tensor, the value ε is added to. torch's denominator is ``sqrt(v) + eps``
with no bias correction, so the value is

.. math::
    \sqrt{v_t} \qquad\text{or, with } \texttt{centered=True},\qquad
    \sqrt{v_t - \bar g_t^2}

computed in float32 as ``sqrt(square_avg)`` (centered:
``sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1))``, exactly what torch adds ε to).
The update itself is torch's: on the reference backend it *is*
``torch.optim.rmsprop.rmsprop`` with the group's flags, so results are torch's bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .bins import LogBins
from .functional import rmsprop as rmsprop_hist
from .optimizer import HistogramMixin, drop_in_doc

__all__ = ["RMSprop"]


class RMSprop(HistogramMixin, torch.optim.RMSprop):
    __doc__ = drop_in_doc("RMSprop", "sqrt(v)\n    (centered: sqrt(v - grad_avg**2)), the value eps is added to")

    _functional = staticmethod(rmsprop_hist)
    _group_options = ("lr", "alpha", "eps", "weight_decay", "momentum")
    _group_options += ("centered", "foreach", "maximize", "differentiable", "capturable")
    _checks_graph_capture = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        track: bool = True,
        bins: LogBins | None = None,
    ) -> None:
        self._init_tracking(track, bins)
        super().__init__(
            params,
            lr,
            alpha,
            eps,
            weight_decay,
            momentum,
            centered,
            capturable,
            foreach,
            maximize,
            differentiable,
        )
        self._finish_tracking()

    def _gather(self, group: dict[str, Any]) -> tuple[list[list[Tensor]], dict[str, Any]]:
        lists = params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps = self._lists(6)
        has_complex = self._init_group(
            group, params, grads, square_avgs, momentum_buffer_list, grad_avgs, state_steps
        )  # torch's order: momentum buffers before grad averages
        return lists, self._options(group, has_complex=has_complex)
