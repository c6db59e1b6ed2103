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
from torch.optim.rmsprop import rmsprop as torch_rmsprop

from . import dispatch
from .bins import LogBins
from .declaration import EpsRangeDecl, OptimizerDecl, register
from .optimizer import HistogramMixin, drop_in_doc
from .reference.rmsprop import rmsprop_hist_inputs
from .reference.staleness import coupled_entering_grads
from .target import DeviceTargets

__all__ = ["RMSprop", "rmsprop"]


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: DeviceTargets | None = None,
    **kwargs: Any,
) -> None:
    """``torch.optim.rmsprop.rmsprop`` (same keyword arguments) plus histograms of the
    value ε is added to: sqrt(square_avg), or sqrt(square_avg - grad_avg**2) when centered."""
    lists = [params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps]
    dispatch.run(RMSPROP, lists, hist, kwargs)


def _eps_pass(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None, **kw: Any) -> Any:
    # betas[1] is RMSprop's alpha (torch's default is 0.99: pass betas=(0.9, 0.99) for it);
    # weight decay is coupled (enters v); lr=0 and eps=1 as in every ε-range pass.
    return RMSprop(params, lr=0.0, alpha=betas[1], eps=1.0, weight_decay=weight_decay, bins=bins, **kw)


def _eps_pass_centered(params: Any, **kw: Any) -> Any:
    return _eps_pass(params, centered=True, **kw)


RMSPROP = register(
    OptimizerDecl(
        name="rmsprop",
        lists=("params", "grads", "square_avgs", "grad_avgs", "momentum_buffer_list", "state_steps"),
        value="sqrt(v) (centered: sqrt(v - grad_avg**2)), the value eps is added to",
        update=torch_rmsprop,
        hist_inputs=rmsprop_hist_inputs,
        bools=frozenset({"centered", "foreach", "maximize", "differentiable", "capturable", "has_complex"}),
        floats=frozenset({"lr", "alpha", "eps", "weight_decay", "momentum"}),
        kernel=("rmsprop", "rmsprop_hist"),
        kernel_dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.complex64),
        eps_ranges=(
            EpsRangeDecl("rmsprop", _eps_pass, "sqrt(v)"),
            EpsRangeDecl("rmsprop-centered", _eps_pass_centered, "sqrt(v - g_avg^2)"),
        ),
        default_states=("square_avgs",),
        entering_grads=coupled_entering_grads,
    )
)


class RMSprop(HistogramMixin, torch.optim.RMSprop):
    __doc__ = drop_in_doc(
        "RMSprop",
        "sqrt(v)\n    (centered: sqrt(v - grad_avg**2)), the value eps is added to",
        note="See ``torch.optim.RMSprop`` for the algorithm.\n\n"
        '    Staleness (``track=("sqrt_v", "staleness")``): ``|g| / max(x, eps)`` with ``g`` the gradient\n'
        "    as it enters ``v`` (negated under ``maximize``, with weight decay) and ``x`` the value above.\n"
        "    Plain RMSprop's ``v_t >= (1 - alpha) g**2`` bounds it by ``1 / sqrt(1 - alpha)`` (10 at the\n"
        "    default 0.99; no bias correction, so no dependence on the step); centered, the\n"
        "    denominator subtracts ``grad_avg**2`` and no such bound holds.",
    )

    declaration = RMSPROP
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
        track: bool | tuple[str, ...] = True,
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
