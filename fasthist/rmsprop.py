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

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from .bins import LogBins
from .functional import rmsprop as rmsprop_hist
from .optimizer import HistogramMixin

__all__ = ["RMSprop"]


class RMSprop(HistogramMixin, torch.optim.RMSprop):
    __doc__ = (
        "Drop-in replacement for :class:`torch.optim.RMSprop` that records log-binned "
        "histograms of sqrt(v)\n    (centered: sqrt(v - grad_avg**2)), the value eps is added to.\n\n"
        "    Every argument of ``torch.optim.RMSprop`` is accepted with its meaning, defaults and\n"
        "    error messages; the extra keyword-only arguments are:\n\n"
        "    Args:\n"
        "        track (bool): record histograms (default: True). A group option too.\n"
        "        bins (LogBins, optional): the binning (default: ``LogBins()``).\n\n"
        "    Query with :meth:`histogram`, :meth:`histograms`, :meth:`quantiles` and\n"
        "    :meth:`eps_range`. See ``torch.optim.RMSprop`` for the algorithm.\n"
    )

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

    @_use_grad_for_differentiable
    def step(self, closure=None):  # noqa: D102 - torch's docstring
        """Perform a single optimization step, recording the histograms.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        self._accelerator_graph_capture_health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params_with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            square_avgs: list[Tensor] = []
            grad_avgs: list[Tensor] = []
            momentum_buffer_list: list[Tensor] = []
            state_steps: list[Tensor] = []

            has_complex = self._init_group(
                group, params_with_grad, grads, square_avgs, momentum_buffer_list, grad_avgs, state_steps
            )
            targets = self._hist_targets(group, params_with_grad) if group["track"] and params_with_grad else None

            rmsprop_hist(
                params_with_grad,
                grads,
                square_avgs,
                grad_avgs,
                momentum_buffer_list,
                state_steps,
                hist=targets,
                lr=group["lr"],
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                centered=group["centered"],
                foreach=group["foreach"],
                maximize=group["maximize"],
                differentiable=group["differentiable"],
                capturable=group["capturable"],
                has_complex=has_complex,
            )

        return loss
