"""The fused tracked CPU steps (``fused_adam.cpp``, ``fused_adagrad.cpp``): ``fused=True`` on
CPU tensors, the update and the histogram of the value it computes in one parallel sweep.

:func:`fused_step_` runs a call :mod:`fasthist.dispatch` chose it for (what the
dispatcher turns down runs torch's fused step, then a histogram pass).
Both states and parameters are torch's fused CPU step's (bit-identical where torch's CPU
kernels are AVX512 or AVX2, see the ``.cpp`` files); the bins are the reference's exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..target import HistTarget

__all__ = ["fused_step_"]

# Where torch's fused CPU kernels, as its x86 wheels compile them, round the other way: Adam's
# ``v`` on the last ``numel % 8`` elements; Adagrad's coefficients (float32 there, rounded to
# bfloat16/float16 before) on the last ``numel % 16``. Found by probing torch's AVX512 and AVX2
# kernels; 0 elsewhere, where only the tolerances of the tests are claimed.
_TAIL = {"adam": 8, "adagrad": 16}
# read once: torch picks its kernels' ISA at startup (ATEN_CPU_CAPABILITY), and a call to
# get_cpu_capability() inside a compiled step is a graph break (it returns a str)
_X86_KERNELS = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2")


def _tail_mod(op: str) -> int:
    return _TAIL[op] if _X86_KERNELS else 0


def fused_step_(op: str, lists: list[list[Tensor]], hist: HistTarget, kwargs: dict[str, Any]) -> None:
    """One fused tracked step of ``op`` (``"adam"``: Adam/AdamW by ``decoupled_weight_decay``;
    ``"adagrad"``) on ``lists`` (the functional form's lists), as torch's ``_fused_adam_`` /
    ``_fused_adagrad_`` ops do it: ``found_inf == 1`` leaves parameters and states untouched
    (any nonzero value the histogram windows). The call must be one :mod:`fasthist.dispatch`
    gave it (contiguous CPU tensors of one float32/bfloat16/float16 dtype, scalar
    hyper-parameters), readied by :func:`fasthist.backend.stepped`: the step counts already
    incremented (and decremented by ``found_inf`` after)."""
    with torch.no_grad():
        _OP_CALLS[op](lists, hist, kwargs)


def _common(op: str, hist: HistTarget, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments every fused op takes the same way."""
    lr, bins = kwargs["lr"], hist.bins
    return {
        "lr": 0.0 if isinstance(lr, Tensor) else float(lr),
        "lr_tensor": lr if isinstance(lr, Tensor) else None,
        "weight_decay": float(kwargs["weight_decay"]),
        "eps": float(kwargs["eps"]),
        "maximize": bool(kwargs.get("maximize")),
        "grad_scale": kwargs.get("grad_scale"),
        "found_inf": kwargs.get("found_inf"),
        "tail_mod": _tail_mod(op),
        "shift": bins.shift,
        "low_key": bins.low_key,
        "num_log_bins": bins.num_log_bins,
        "rows": hist.rows,
        "step": hist.step,
        "total": hist.total,
    }


def _adam(lists: list[list[Tensor]], hist: HistTarget, kwargs: dict[str, Any]) -> None:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    torch.ops.fasthist.fused_adam_hist_(
        [p.detach() for p in params],
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if kwargs.get("amsgrad") else [],
        steps,
        amsgrad=bool(kwargs.get("amsgrad")),
        adamw=bool(kwargs.get("decoupled_weight_decay")),
        beta1=float(kwargs["beta1"]),
        beta2=float(kwargs["beta2"]),
        **_common("adam", hist, kwargs),
    )


def _adagrad(lists: list[list[Tensor]], hist: HistTarget, kwargs: dict[str, Any]) -> None:
    params, grads, state_sums, steps = lists
    torch.ops.fasthist.fused_adagrad_hist_(
        [p.detach() for p in params],
        grads,
        state_sums,
        steps,
        lr_decay=float(kwargs["lr_decay"]),
        **_common("adagrad", hist, kwargs),
    )


_OP_CALLS = {"adam": _adam, "adagrad": _adagrad}
