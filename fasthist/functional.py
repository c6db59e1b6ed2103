"""Functional forms of the fasthist optimizers: the optimizer math plus histogram
accumulation, dispatched per device to a backend (see :mod:`fasthist.backend`).

``hist`` maps each device to ``(indices of the tensors on it, HistTarget)``
(:data:`fasthist.target.DeviceTargets`, built by the optimizer's step); ``None`` records
nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor

from . import compiled, csrc
from .backend import kernels_module, select_backend
from .dtensor import is_dtensor, local_tensor
from .reference.adabelief import adabelief_reference
from .reference.adagrad import adagrad_reference
from .reference.adam import adam_reference
from .reference.rmsprop import rmsprop_reference
from .target import DeviceTargets

__all__ = ["adam", "rmsprop", "adagrad", "adabelief"]


def _split(lists: list[list[Tensor]], idx: list[int]) -> list[list[Tensor]]:
    return [[lst[i] for i in idx] if lst else lst for lst in lists]


def _locals(lists: list[list[Tensor]]) -> list[list[Tensor]]:
    """DTensors (FSDP2, tensor parallel) replaced by their local shards, which share their
    storage: the kernels walk raw pointers, and a DTensor's ``data_ptr()`` is 0."""
    if not any(is_dtensor(t) for lst in lists for t in lst):
        return lists
    return [[local_tensor(t) for t in lst] for lst in lists]


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
    _dispatch("adam", adam_reference, lists, hist, kwargs)


def _dispatch(
    op: str,
    reference: Any,
    lists: list[list[Tensor]],
    hist: DeviceTargets | None,
    kwargs: dict[str, Any],
) -> None:
    """Run ``op`` per device on the kernel backend (``fasthist.kernels.<op>.<op>_hist``)
    or the reference: the reference wherever the kernels do not run (no CUDA and no forced
    Triton, no Triton), and for what ``fasthist.kernels.kernel_supports`` turns down inside
    the kernel op, so the optimizer works wherever torch does. A tracked ``fused=True``
    call elsewhere runs the compiled fused CPU step where it can (``fasthist.csrc.fused_supports``)."""
    params = lists[0]
    if not params:
        return
    if hist is None:
        groups: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(p.device, []).append(i)
        calls = [(dev, idx, None) for dev, idx in groups.items()]
    else:
        calls = [(dev, idx, target) for dev, (idx, target) in hist.items()]
    whole = len(calls) == 1
    for device, idx, target in calls:
        sub = lists if whole else _split(lists, idx)
        triton = select_backend(device) == "triton"
        if torch.compiler.is_compiling() and (triton or op in compiled.OPAQUE_REFERENCES):
            compiled.functional_(op, triton, _locals(sub) if triton else sub, target, kwargs)  # one graph node
            continue
        kernel = _kernel_op(op) if triton else None
        if kernel is not None:  # it runs what it cannot take on the reference (kernels.kernel_supports)
            kernel(*_locals(sub), hist=target, **kwargs)
        elif not csrc.fused_step_(op, sub, target, kwargs):  # fused=True on CPU: the compiled step, if it takes it
            reference(*sub, hist=target, **kwargs)


_KERNEL_OPS: dict[str, Any] = {}


def _kernel_op(op: str) -> Any:
    """``fasthist.kernels.<op>.<op>_hist`` if that module imports, else None (cached)."""
    if op not in _KERNEL_OPS:
        mod = kernels_module()
        try:
            kernel = importlib.import_module(f"{mod.__name__}.{op}") if mod is not None else None
        except ImportError:
            kernel = None
        _KERNEL_OPS[op] = getattr(kernel, f"{op}_hist", None)
    return _KERNEL_OPS[op]


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
    _dispatch("rmsprop", rmsprop_reference, lists, hist, kwargs)


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
    _dispatch("adagrad", adagrad_reference, [params, grads, state_sums, state_steps], hist, kwargs)


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
    (1-beta2)*s_hat; keyword arguments of :func:`fasthist.reference.adabelief.adabelief_reference`."""
    lists = [params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps]
    _dispatch("adabelief", adabelief_reference, lists, hist, kwargs)
