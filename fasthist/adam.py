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
from torch.optim.adam import Adam as TorchAdam
from torch.optim.adam import adam as torch_adam
from torch.optim.optimizer import ParamsT

from . import dispatch
from .bins import LogBins
from .declaration import EpsRangeDecl, FusedCpuDecl, OptimizerDecl, register
from .optimizer import HistogramMixin, drop_in_doc
from .reference.adam import adam_entering_grads, adam_hist_inputs
from .target import DeviceTargets

__all__ = ["Adam", "AdamW", "adam"]


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: DeviceTargets | None = None,
    **kwargs: Any,
) -> None:
    """``torch.optim.adam.adam`` (same keyword arguments) plus histograms of sqrt(v_hat)."""
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
    dispatch.run(ADAM, lists, hist, kwargs)


def _eps_pass(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> Adam:
    # Coupled weight decay: torch's Adam adds weight_decay * param to the gradient.
    return Adam(params, lr=0.0, betas=betas, eps=1.0, weight_decay=weight_decay, bins=bins)


def _eps_pass_w(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> AdamW:
    # Decoupled weight decay never reaches the moments; with lr=0 it scales weights by 1.0.
    return AdamW(params, lr=0.0, betas=betas, eps=1.0, weight_decay=weight_decay, bins=bins)


ADAM = register(
    OptimizerDecl(
        name="adam",
        lists=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
        value="sqrt(v_hat)",
        update=torch_adam,
        hist_inputs=adam_hist_inputs,
        bools=frozenset(
            {"amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "has_complex"}
            | {"decoupled_weight_decay"}
        ),
        floats=frozenset({"lr", "beta1", "beta2", "weight_decay", "eps"}),
        tensors=frozenset({"grad_scale", "found_inf"}),
        kernel=("adam", "adam_hist"),
        kernel_dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.complex64),
        # torch's x86 fused kernel contracts v the other way on its scalar tail, the last
        # numel % 8 elements (found by probing its AVX512 and AVX2 kernels)
        fused_cpu=FusedCpuDecl(
            "fused_adam_hist_",
            ("amsgrad", "decoupled_weight_decay", "beta1", "beta2", "weight_decay", "eps", "maximize"),
            x86_tail=8,
        ),
        eps_ranges=(
            EpsRangeDecl("adam", _eps_pass, "sqrt(v_hat)"),
            EpsRangeDecl("adamw", _eps_pass_w, "sqrt(v_hat)"),
        ),
        default_states=("exp_avgs", "exp_avg_sqs"),
        entering_grads=adam_entering_grads,
        default=True,
    )
)


class Adam(HistogramMixin, torch.optim.Adam):
    __doc__ = drop_in_doc(
        "Adam",
        "sqrt(v_hat)",
        note="See ``torch.optim.Adam`` for the algorithm.\n\n"
        '    Staleness (``track=("sqrt_v", "staleness")``, :mod:`fasthist.health`): per element\n'
        "    ``s = |g| / max(x, eps)``, with ``x`` exactly the ``sqrt(v_hat)`` value binned above (the\n"
        "    AMSGrad maximum with ``amsgrad``) and ``g`` the gradient as it enters ``v``: unscaled by\n"
        "    ``grad_scale``, negated under ``maximize``, plus ``weight_decay * param`` (the parameter\n"
        "    before the update) for Adam's coupled decay, computed as torch computes it (in the\n"
        "    parameter's dtype, or in float32 in the fused step), widened to float32; ``s`` is one\n"
        "    float32 IEEE division (float64 for float64 parameters), binned with the same bins,\n"
        '    exactly. ``s <= sqrt((1 - beta2**t) / (1 - beta2))``. Query it with ``quantity="staleness"``\n'
        "    and :meth:`staleness_rms`.",
    )

    declaration = ADAM
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
        track: bool | tuple[str, ...] = True,
        bins: LogBins | None = None,
    ) -> None:
        self._init_tracking(track, bins)
        # torch.optim.Adam's own __init__ (not super()): in fasthist.AdamW the next class in
        # the MRO is torch.optim.AdamW, whose __init__ takes no decoupled_weight_decay. Bound at
        # import: torch.optim.Adam may since have been replaced by this class (a drop-in swap).
        TorchAdam.__init__(
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
        "    :class:`fasthist.Adam` for ``track`` (staleness included: the decoupled decay never\n"
        "    enters ``g``) and ``bins``.\n"
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
        track: bool | tuple[str, ...] = True,
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
