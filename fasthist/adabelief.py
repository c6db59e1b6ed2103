r"""``fasthist.AdaBelief``: the AdaBelief optimizer (Zhuang et al., "AdaBelief Optimizer:
Adapting Stepsizes by the Belief in Observed Gradients", NeurIPS 2020) exactly as the
``adabelief-pytorch`` package (v0.2) implements it, with its defaults (``eps=1e-16``,
decoupled weight decay, RAdam-style rectification), that also histograms, at every step
and per parameter tensor, the value ε competes with:

.. math::
    (1-\beta_2)\,\hat s_t = (1-\beta_2)\,\frac{s_t}{1-\beta_2^t}
    \qquad (s_t \text{ replaced by } s^{max}_t \text{ with amsgrad and rectify=False})

**Why this value, and no square root.** AdaBelief adds ε twice: into the state every step,
``s_t = β2·s_{t-1} + (1-β2)·(g_t-m_t)² + ε``, and outside the square root,
``√ŝ_t + ε``. Unrolled, ``(1-β2)·ŝ_t = (1-β2)·EMA_hat((g-m)²) + ε``: the bias-corrected
average of the per-step increments, of which ε is one. So the ε inside the state competes
with ``(1-β2)·(g-m)²`` in ε's own units, and it is the one that matters: since
``s_t >= ε``, ``√s_t >= √ε``, which dwarfs the outer ε for any ``ε < 1`` (1e-8 against
1e-16 at the default). The histogram therefore has a floor at ε (the stored state holds
ε; subtracting it back in float32 would cancel catastrophically): elements piled up
near ε are ε-dominated (SGD-like), elements far right of ε are adaptive. Draw ε on the
same axis as the histogram, unscaled.

The value is computed as ``float32(s) / float32((1 - β2**t) / (1 - β2))`` with the
divisor in float64 on the host. Differences from the package, none of which changes the
result: options are per param group (the package keeps ``weight_decouple`` & co. on the
optimizer), the step count is a tensor as in ``torch.optim``, ``p.grad`` is never written
(the package adds coupled weight decay into it in place), nothing is printed
(``print_change_log`` is accepted and ignored), and with ``lr=0`` the parameters are left
alone instead of receiving ``-0.0 * m/denom`` (NaN with ``eps=0`` where ``s = 0``): that is
how :func:`fasthist.estimate_eps_range` runs AdaBelief with ``eps=0``, histogramming the
ε-free ``(1-β2)·EMA_hat((g-m)²)`` with dead elements at exactly 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import dispatch
from .bins import LogBins
from .declaration import EpsRangeDecl, OptimizerDecl, register
from .optimizer import TRACKING_ARGS_DOC, HistogramMixin
from .reference.adabelief import adabelief_hist_inputs, adabelief_update
from .target import DeviceTargets

__all__ = ["AdaBelief", "adabelief"]


def adabelief(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
    hist: DeviceTargets | None = None,
    **kwargs: Any,
) -> None:
    """AdaBelief as ``adabelief_pytorch.AdaBelief`` computes it, plus histograms of
    (1-beta2)*s_hat; keyword arguments of :func:`fasthist.reference.adabelief.adabelief_update`."""
    lists = [params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps]
    dispatch.run(ADABELIEF, lists, hist, kwargs)


def _eps_pass(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> Any:
    # eps enters AdaBelief's state (the histogram would have a floor at eps, where dead
    # elements pile up instead of being exact zeros), so the pass runs with eps=0: the
    # eps-free (1-beta2)*EMA_hat((g-m)^2). fasthist.AdaBelief skips the update at lr=0, so
    # 0/0 never reaches the weights. Decoupled decay (the package default) never reaches
    # the moments.
    return AdaBelief(params, lr=0.0, betas=betas, eps=0.0, weight_decay=weight_decay, bins=bins)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 parameters keep float32 moments (as the package does); others their own dtype."""
    return torch.float32 if dtype == torch.float16 else dtype


ADABELIEF = register(
    OptimizerDecl(
        name="adabelief",
        lists=("params", "grads", "exp_avgs", "exp_avg_vars", "max_exp_avg_vars", "state_steps"),
        value="(1-beta2) * s_hat",
        update=adabelief_update,
        hist_inputs=adabelief_hist_inputs,
        sqrt=False,
        reciprocal=True,
        bools=frozenset({"amsgrad", "weight_decouple", "fixed_decay", "rectify", "degenerated_to_sgd"}),
        floats=frozenset({"lr", "beta1", "beta2", "eps", "weight_decay"}),
        kernel=("adabelief", "adabelief_hist"),
        # float16 AdaBelief steps in float32 with float32 states (as the package does): no kernel
        kernel_dtypes=(torch.float32, torch.bfloat16),
        opaque_update=True,
        eps_ranges=(EpsRangeDecl("adabelief", _eps_pass, "(1-beta2)*s_hat"),),
        default_states=("exp_avgs", "exp_avg_vars"),
        no_staleness=(
            "its second moment averages (g - m)^2, the gradient's deviation from its momentum, not g^2; "
            "|g| / sqrt(s_hat) compares unlike quantities"
        ),
        state_dtype=_state_dtype,
    )
)

_MOMENTS = ("exp_avg", "exp_avg_var", "max_exp_avg_var")


class AdaBelief(HistogramMixin, Optimizer):
    __doc__ = (
        "Drop-in replacement for ``adabelief_pytorch.AdaBelief`` that records log-binned\n"
        "    histograms of ``(1-beta2) * s_hat`` (see the module docstring for why).\n\n"
        "    Args:\n"
        "        params (iterable): parameters to optimize or dicts defining parameter groups.\n"
        "        lr (float): learning rate (default: 1e-3).\n"
        "        betas (tuple[float, float]): coefficients of the running averages of the gradient\n"
        "            and of its squared deviation from that average (default: (0.9, 0.999)).\n"
        "        eps (float): added into ``s_t`` every step and to the denominator (default: 1e-16).\n"
        "        weight_decay (float): weight decay (default: 0).\n"
        "        amsgrad (bool): keep the running maximum of ``s_t`` (default: False).\n"
        "        weight_decouple (bool): decoupled weight decay (Loshchilov & Hutter, 2019; default: True).\n"
        "        fixed_decay (bool): with ``weight_decouple``, decay by ``weight_decay`` instead of\n"
        "            ``lr * weight_decay`` (default: False).\n"
        "        rectify (bool): RAdam's rectified update (default: True).\n"
        "        degenerated_to_sgd (bool): while the rectification term is undefined, take an SGD\n"
        "            with momentum step instead of none (default: True).\n"
        "        print_change_log (bool): accepted for compatibility; nothing is printed.\n"
        f"{TRACKING_ARGS_DOC}\n"
        "    fp16 parameters are stepped in float32 with float32 states, as the package does.\n\n"
        '    No staleness (``track`` refuses ``"staleness"``): AdaBelief\'s ``s_t`` averages\n'
        "    ``(g - m)**2``, the gradient's deviation from its own momentum, plus ``eps``; ``|g|``\n"
        "    over ``sqrt(s_hat)`` compares the gradient with its noise, not with what the state\n"
        "    expects of it (the analogue, ``|g - m| / sqrt(s_hat)``, would need ``m`` of the step\n"
        "    before, which no backend keeps).\n"
    )
    declaration = ADABELIEF

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0,
        amsgrad: bool = False,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
        print_change_log: bool = False,
        *,
        track: bool | tuple[str, ...] = True,
        bins: LogBins | None = None,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self._init_tracking(track, bins)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "weight_decouple": weight_decouple,
            "fixed_decay": fixed_decay,
            "rectify": rectify,
            "degenerated_to_sgd": degenerated_to_sgd,
            "track": track,
        }
        super().__init__(params, defaults)
        self._finish_tracking()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)

    def _load_param_state(self, p: Tensor, saved: dict[str, Any]) -> None:
        # torch casts loaded moments to the parameter's dtype; fp16 parameters keep float32
        # moments here (as the package does), so put the saved float32 values back.
        if p.dtype != torch.float16:
            return
        for key in _MOMENTS:
            if key in saved:
                self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_vars: list[Tensor],
        max_exp_avg_vars: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        self._note_empty_entries(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdaBelief does not support sparse gradients, please consider SparseAdam instead")
            if p.is_complex():
                raise TypeError("AdaBelief does not support complex parameters")
            params_with_grad.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                dtype = _state_dtype(p.dtype)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_var"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_var" not in state:
                state["max_exp_avg_var"] = torch.zeros_like(state["exp_avg_var"], memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_vars.append(state["exp_avg_var"])
            if group["amsgrad"]:
                max_exp_avg_vars.append(state["max_exp_avg_var"])
            state_steps.append(state["step"])
        if group["track"] and params_with_grad:
            self._prepare_tracking(params_with_grad)

    def _gather(self, group: dict[str, Any]) -> tuple[list[list[Tensor]], dict[str, Any]]:
        lists = params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps = self._lists(6)
        self._init_group(group, params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps)
        beta1, beta2 = group["betas"]
        return lists, self._options(group, beta1=beta1, beta2=beta2)
