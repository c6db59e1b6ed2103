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

    _functional = staticmethod(adam_hist)
    _checks_graph_capture = True

    def _gather(self, group: dict[str, Any]) -> tuple[list[list[Tensor]], dict[str, Any]]:
        params_with_grad: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        beta1, beta2 = group["betas"]
        has_complex = self._init_group(
            group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        )
        lists = [params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
        return lists, {
            "amsgrad": group["amsgrad"],
            "has_complex": has_complex,
            "beta1": beta1,
            "beta2": beta2,
            "lr": group["lr"],
            "weight_decay": group["weight_decay"],
            "eps": group["eps"],
            "maximize": group["maximize"],
            "foreach": group["foreach"],
            "capturable": group["capturable"],
            "differentiable": group["differentiable"],
            "fused": group["fused"],
            "grad_scale": getattr(self, "grad_scale", None),
            "found_inf": getattr(self, "found_inf", None),
            "decoupled_weight_decay": group["decoupled_weight_decay"],
        }


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
