"""The fused tracked CPU steps (``fused_adam.cpp``, ``fused_adagrad.cpp``): ``fused=True`` on
CPU tensors, the update and the histogram of the value it computes in one parallel sweep.

:func:`fused_supports` is the one decision: what it turns down runs on the reference
backend (torch's fused step, then the histogram pass). :func:`fused_step_` runs a call.
Both states and parameters are torch's fused CPU step's (bit-identical where torch's CPU
kernels are AVX512 or AVX2, see the ``.cpp`` files); the bins are the reference's exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..dtensor import is_dtensor
from ..target import HistTarget
from .library import enabled
from .library import load as _load

__all__ = ["fused_step_", "fused_supports"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OPS = ("adam", "adagrad")
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


def _plain_cpu(tensors: list[Tensor], dtype: torch.dtype) -> bool:
    """Every tensor dense, contiguous, on the CPU, of ``dtype`` (the layout before
    ``is_contiguous()``, which a sparse tensor does not answer). Runs over every tensor of
    every step, so it reads four cheap attributes and nothing else: DTensors are turned down
    by their parameters (their states and gradients are DTensors too), and ``requires_grad``
    states only exist with ``differentiable``, turned down before."""
    return all(t.is_cpu and t.dtype == dtype and t.layout == torch.strided and t.is_contiguous() for t in tensors)


def fused_supports(op: str, lists: list[list[Tensor]], hist: HistTarget | None, kwargs: dict[str, Any]) -> bool:
    """True when the compiled fused step runs this call: ``fused=True``, tracked, CPU,
    one float32/bfloat16/float16 dtype over contiguous plain tensors (no DTensor, no
    non-contiguous state: a strided walk is not what the kernel does, no sparse gradient),
    scalar hyper-parameters, ``lr`` a float or a CPU tensor, no ``differentiable``."""
    if op not in _OPS or hist is None or not kwargs.get("fused") or not enabled():
        return False
    if kwargs.get("differentiable") or kwargs.get("has_sparse_grad") or hist.step.device.type != "cpu":
        return False
    if any(isinstance(kwargs.get(k), Tensor) for k in ("beta1", "beta2", "weight_decay", "eps", "lr_decay")):
        return False
    lr = kwargs.get("lr")
    if isinstance(lr, Tensor) and (lr.device.type != "cpu" or lr.numel() != 1):
        return False
    for name in ("grad_scale", "found_inf"):
        t = kwargs.get(name)
        if t is not None and (t.device.type != "cpu" or t.numel() != 1):
            return False
    params, steps = lists[0], lists[-1]
    if not params or params[0].dtype not in _DTYPES:
        return False
    dtype = params[0].dtype
    if any(is_dtensor(p) for p in params) or not all(_plain_cpu(lst, dtype) for lst in lists[:-1]):
        return False
    if not all(s.is_cpu and s.numel() == 1 for s in steps):
        return False
    return all(w.dtype == torch.int64 and w.dim() == 2 and w.stride(1) == 1 for w in (hist.step, hist.total)) and (
        _load() is not None
    )


def fused_step_(op: str, lists: list[list[Tensor]], hist: HistTarget | None, kwargs: dict[str, Any]) -> bool:
    """One fused tracked step of ``op`` (``"adam"``: Adam/AdamW by ``decoupled_weight_decay``;
    ``"adagrad"``) on ``lists`` (the functional form's lists), as torch's ``_fused_adam`` /
    ``_fused_adagrad`` do it: the step counts are incremented first, and decremented by
    ``found_inf`` after. Returns False, having done nothing, when :func:`fused_supports`
    turns the call down."""
    if not fused_supports(op, lists, hist, kwargs):
        return False
    steps, found_inf = lists[-1], kwargs.get("found_inf")
    with torch.no_grad():
        torch._foreach_add_(steps, 1)
        _OP_CALLS[op](lists, hist, kwargs)
        if found_inf is not None:
            torch._foreach_sub_(steps, [found_inf] * len(steps))
    return True


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
