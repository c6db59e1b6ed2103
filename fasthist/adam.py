r"""``fasthist.Adam`` and ``fasthist.AdamW``: ``torch.optim.Adam``/``AdamW`` that also
histogram, at every step and per parameter tensor, the value ε is added to:

.. math::
    \sqrt{\hat v_t} = \sqrt{v_t} / \sqrt{1-\beta_2^t}
    \qquad (v_t \text{ replaced by } v^{max}_t \text{ with amsgrad})

computed in float32 as ``float32(sqrt(v)) / float32(sqrt(1 - beta2**step))`` (the bias
correction in float64 on the host, or in float32 on the device when the step count lives
there, as torch computes it). The update itself is torch's: on the reference backend it
*is* ``torch.optim.adam.adam`` with the group's flags, so results are torch's bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .bins import LogBins
from .functional import adam as adam_hist
from .optimizer import HistogramMixin, drop_in_doc

__all__ = ["Adam", "AdamW"]


class Adam(HistogramMixin, torch.optim.Adam):
    __doc__ = drop_in_doc("Adam", "sqrt(v_hat)")

    _functional = staticmethod(adam_hist)
    _group_options = ("amsgrad", "lr", "weight_decay", "eps", "maximize")
    _group_options += ("foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")
    _checks_graph_capture = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        track: bool = True,
        bins: LogBins | None = None,
    ) -> None:
        self._init_tracking(track, bins)
        # torch.optim.Adam's own __init__ (not super()): in fasthist.AdamW the next class in
        # the MRO is torch.optim.AdamW, whose __init__ takes no decoupled_weight_decay.
        torch.optim.Adam.__init__(
            self,
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._finish_tracking()

    def _gather(self, group: dict[str, Any]) -> tuple[list[list[Tensor]], dict[str, Any]]:
        lists = params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = self._lists(6)
        has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        beta1, beta2 = group["betas"]
        kwargs = self._options(group, has_complex=has_complex, beta1=beta1, beta2=beta2, **self._grad_scaler_args())
        return lists, kwargs


class AdamW(Adam, torch.optim.AdamW):
    __doc__ = (
        "Drop-in replacement for :class:`torch.optim.AdamW` (Adam with decoupled weight decay,\n"
        "    default 1e-2) that records log-binned histograms of sqrt(v_hat); see\n"
        "    :class:`fasthist.Adam` for ``track`` and ``bins``.\n"
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        track: bool = True,
        bins: LogBins | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            track=track,
            bins=bins,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
