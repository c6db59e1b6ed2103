r"""``fasthist.Adagrad``: ``torch.optim.Adagrad`` that also histograms, at every step and
per parameter tensor, the value ε is added to. torch's denominator is
``sqrt(sum) + eps`` with ``sum = initial_accumulator_value + Σ g²``, so the value is

.. math::
    \sqrt{\textstyle\sum_{k \le t} g_k^2 + \text{initial\_accumulator\_value}}

computed in float32 as ``sqrt(sum)``. The update itself is torch's: on the reference
backend it *is* ``torch.optim.adagrad.adagrad`` with the group's flags (sparse gradients,
``lr_decay``, ``fused`` with ``grad_scale``/``found_inf`` included), so results are torch's
bit for bit. With sparse gradients the histogram covers the whole accumulator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adagrad import adagrad as torch_adagrad
from torch.optim.optimizer import ParamsT

from . import dispatch
from .bins import LogBins
from .declaration import EpsRangeDecl, FusedCpuDecl, OptimizerDecl, register
from .optimizer import HistogramMixin, drop_in_doc
from .reference.adagrad import adagrad_hist_inputs
from .target import DeviceTargets

__all__ = ["Adagrad", "adagrad"]


def adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: DeviceTargets | None = None,
    **kwargs: Any,
) -> None:
    """``torch.optim.adagrad.adagrad`` (same keyword arguments) plus histograms of sqrt(sum)."""
    dispatch.run(ADAGRAD, [params, grads, state_sums, state_steps], hist, kwargs)


def _eps_pass(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> Any:
    # no betas; coupled weight decay; initial_accumulator_value 0 as torch's default
    return Adagrad(params, lr=0.0, eps=1.0, weight_decay=weight_decay, bins=bins)


ADAGRAD = register(
    OptimizerDecl(
        name="adagrad",
        lists=("params", "grads", "state_sums", "state_steps"),
        value="sqrt(sum), the value eps is added to",
        update=torch_adagrad,
        hist_inputs=adagrad_hist_inputs,
        bools=frozenset({"foreach", "maximize", "differentiable", "fused", "has_sparse_grad", "has_complex"}),
        floats=frozenset({"lr", "weight_decay", "lr_decay", "eps"}),
        tensors=frozenset({"grad_scale", "found_inf"}),
        kernel=("adagrad", "adagrad_hist"),
        kernel_dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.complex64),
        # torch's x86 fused kernel takes its coefficients in float32 on the last numel % 16
        # elements (rounded to bfloat16/float16 before on the others; found by probing its
        # AVX512 and AVX2 kernels)
        fused_cpu=FusedCpuDecl("fused_adagrad_hist_", ("lr_decay", "weight_decay", "eps", "maximize"), x86_tail=16),
        eps_ranges=(EpsRangeDecl("adagrad", _eps_pass, "sqrt(sum g^2)"),),
        default_states=("state_sums",),
        no_staleness=(
            "its state is a sum, not an average: |g| / sqrt(sum g^2) shrinks like 1/sqrt(step) "
            "whatever the gradients do, so it does not say whether the state still describes them"
        ),
    )
)


class Adagrad(HistogramMixin, torch.optim.Adagrad):
    __doc__ = drop_in_doc(
        "Adagrad",
        "sqrt(sum),\n    the value eps is added to",
        note="torch's Adagrad creates every state at construction, so\n"
        "    every tracked tensor has an (empty) row before the first step.\n\n"
        '    No staleness (``track`` refuses ``"staleness"``): Adagrad\'s state is the sum of every\n'
        "    ``g**2`` so far, not a running average, so ``|g| / sqrt(sum)`` decays like ``1/sqrt(t)``\n"
        "    whatever the gradients do; it measures the age of the run, not whether the state\n"
        "    still describes the gradients.",
    )

    declaration = ADAGRAD

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        track: bool | tuple[str, ...] = True,
        bins: LogBins | None = None,
    ) -> None:
        self._init_tracking(track, bins)
        super().__init__(
            params,
            lr,
            lr_decay,
            weight_decay,
            initial_accumulator_value,
            eps,
            foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
        )
        self._finish_tracking()

    def _gather(self, group: dict[str, Any]) -> tuple[list[list[Tensor]], dict[str, Any]]:
        lists = params, grads, state_sums, state_steps = self._lists(4)
        has_sparse_grad, has_complex = self._init_group(group, params, grads, state_sums, state_steps)
        kwargs = self._options(
            group, has_sparse_grad=has_sparse_grad, has_complex=has_complex, **self._grad_scaler_args()
        )
        return lists, kwargs
