"""The backends a functional call runs on, and the user's choice among them.

Each backend takes the call as :mod:`fasthist.dispatch` hands it over (one device, the
lists of the optimizer's functional form, its :class:`~fasthist.target.HistTarget` or
None, its keyword arguments) and runs it; none checks whether it should, and none falls
back on another: choosing is the dispatcher's, which records why. The torch backends run
torch's functional, which keeps the step counts itself; around the others, :func:`stepped`
keeps them as torch's fused step does and readies ``found_inf``, ``grad_scale`` and ``lr``.

- :data:`TRITON`: the optimizer's Triton kernel (``fasthist.kernels``), update and
  histogram fused, one launch per dtype; CUDA tensors, or CPU tensors under Triton's
  interpreter (``TRITON_INTERPRET=1``).
- :data:`FUSED_CPU`: the compiled fused CPU step (:func:`fasthist.csrc.fused_step_`),
  update and histogram in one parallel sweep; ``fused=True`` on CPU tensors.
- :data:`CPU_HISTOGRAM`: the torch update, then the compiled CPU histogram pass
  (:func:`fasthist.csrc.histogram_`): the same bins as the torch ops, one sweep.
- :data:`TORCH`: the torch update, then the histogram pass in torch ops
  (:mod:`fasthist.reference`): the oracle, and what runs wherever nothing faster does.

The two torch backends also write the staleness windows of a target that has them
(:mod:`fasthist.reference.staleness`, binned by their own histogram pass); the Triton and
fused CPU backends take such a call only where they say they do (:mod:`fasthist.dispatch`).

The user's knob is ``FASTHIST_BACKEND`` (read at every step), or :func:`use` in code:

- ``auto`` (default): the fastest backend that takes the call;
- ``torch``: no Triton kernels (the compiled CPU passes still run where they take a call;
  ``FASTHIST_CPU_KERNEL=0`` turns those off);
- ``reference``: the pure torch ops everywhere (the oracle of the tests);
- ``triton``: the kernels wherever they take the call; on CPU tensors they run under the
  interpreter (``TRITON_INTERPRET=1``, set here before Triton compiles anything).
"""

from __future__ import annotations

import contextlib
import importlib
import numbers
import operator
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_capturable_supported_devices

from . import csrc
from .declaration import OptimizerDecl
from .dtensor import is_dtensor, local_tensor
from .reference.histogram import accumulate_, record_
from .reference.staleness import record_staleness_
from .target import HistTarget

__all__ = [
    "BACKENDS",
    "CPU_HISTOGRAM",
    "FUSED_CPU",
    "TORCH",
    "TRITON",
    "check",
    "kernels_module",
    "requested",
    "run",
    "stepped",
    "use",
]

BACKENDS = ("auto", "torch", "reference", "triton")
TRITON, FUSED_CPU, CPU_HISTOGRAM, TORCH = "triton", "fused_cpu", "torch+cpu_histogram", "torch"

_kernels: ModuleType | None = None
_kernels_error: BaseException | None = None
_override: str | None = None


def requested() -> str:
    """What the user asked for: :func:`use`'s backend inside one, else ``FASTHIST_BACKEND``."""
    value = _override or os.environ.get("FASTHIST_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"Invalid FASTHIST_BACKEND: {value!r}; expected one of {', '.join(BACKENDS)}")
    return value


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Within the block, steps choose as ``FASTHIST_BACKEND=backend`` would (``auto``,
    ``torch``, ``reference`` or ``triton``; see the module docstring), whatever the
    environment says. ``opt.backends()`` tells what ran."""
    global _override
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {', '.join(BACKENDS)}")
    previous, _override = _override, backend
    try:
        yield
    finally:
        _override = previous


def kernels_module(*, interpret: bool = False) -> ModuleType | None:
    """``fasthist.kernels`` if it imports, else None. ``interpret`` asks for the Triton
    interpreter; it must be decided before the first import of the kernels."""
    global _kernels, _kernels_error
    if _kernels is None and _kernels_error is None:
        if interpret:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        try:
            _kernels = importlib.import_module("fasthist.kernels")
        except ImportError as e:  # no Triton, or the kernels have not landed
            _kernels_error = e
    return _kernels


def interpreting() -> bool:
    """Whether Triton runs under its interpreter (``TRITON_INTERPRET`` set)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_error() -> BaseException | None:
    """Why ``fasthist.kernels`` did not import (None when it did, or was not tried)."""
    return _kernels_error


_KERNEL_FUNCTIONS: dict[tuple[str, str], Callable[..., None] | None] = {}


def kernel_function(decl: OptimizerDecl) -> Callable[..., None] | None:
    """``decl``'s Triton launcher if its module imports, else None (cached)."""
    if decl.kernel is None:
        return None
    if decl.kernel not in _KERNEL_FUNCTIONS:
        mod = kernels_module()
        module, name = decl.kernel
        try:
            found = importlib.import_module(f"{mod.__name__}.{module}") if mod is not None else None
        except ImportError:
            found = None
        _KERNEL_FUNCTIONS[decl.kernel] = getattr(found, name, None)
    return _KERNEL_FUNCTIONS[decl.kernel]


def local_lists(lists: list[list[Tensor]]) -> list[list[Tensor]]:
    """DTensors (FSDP2, tensor parallel) replaced by their local shards, which share their
    storage: the kernels walk raw pointers, and a DTensor's ``data_ptr()`` is 0."""
    if not any(is_dtensor(t) for lst in lists for t in lst):
        return lists
    return [[local_tensor(t) for t in lst] for lst in lists]


def _compiled_histogram_(target: HistTarget, values: list[Tensor], scale: Any, found_inf: Any, **flags: bool) -> None:
    values = [local_tensor(v) for v in values] if any(is_dtensor(v) for v in values) else values
    if not csrc.histogram_(target, (values, scale, found_inf), **flags):
        raise RuntimeError("fasthist: the compiled CPU histogram pass turned down a call the dispatcher gave it")


def check(
    backend: str, decl: OptimizerDecl, device: torch.device, lists: list[list[Tensor]], kwargs: dict[str, Any]
) -> None:
    """Raise what running this per-device call of ``decl`` on ``backend`` would raise only
    after writing some of it, before anything is written: a hyper-parameter (``decl.floats``:
    a group option, changeable after construction) that is neither a real number nor one
    value in a tensor; ``found_inf`` (and ``grad_scale``, which :func:`stepped` reads as one
    value) not one value; for torch's functional, its own refusals (step counts that are not
    tensors, ``capturable`` off the devices it supports); a state tensor whose dtype, device
    or shape no longer matches its parameter's, for torch's functional (:func:`check_states`;
    the Triton and compiled CPU backends check every tensor themselves before they write one)."""
    for key in sorted(decl.floats):
        value = kwargs.get(key)
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise RuntimeError(
                    f"fasthist: {key} must be a float or a one-element Tensor, but got shape {tuple(value.shape)}"
                )
        elif value is not None and not isinstance(value, (numbers.Real, torch.SymFloat)):
            raise TypeError(f"fasthist: {key} must be a float or a one-element Tensor, but got {value!r}")
    readied = backend in (TRITON, FUSED_CPU)
    for key in ("found_inf", "grad_scale") if readied else ("found_inf",):
        t = kwargs.get(key)
        if t is not None and t.numel() != 1:
            raise RuntimeError(f"fasthist: {key} must be None or a one-element Tensor, but got shape {tuple(t.shape)}")
    if readied:
        return
    check_states(decl, lists, flat=bool(kwargs.get("fused")))
    if not all(isinstance(s, Tensor) for s in lists[-1]):  # torch's words
        raise RuntimeError("API has changed, `state_steps` argument must contain a list of singleton tensors")
    if kwargs.get("capturable") and not kwargs.get("fused") and not torch.compiler.is_compiling():
        supported = _get_capturable_supported_devices()
        if device.type not in supported:  # torch's check, type and words, before its first tensor
            raise AssertionError(
                f"If capturable=True, params and state_steps must be on supported devices: {supported}."
            )


_META = operator.attrgetter("dtype", "device", "shape")
_FLAT_META = operator.attrgetter("dtype", "device")


def check_states(decl: OptimizerDecl, lists: list[list[Tensor]], *, flat: bool = False) -> None:
    """Raise RuntimeError, before anything is written, where a state tensor (every list of
    ``decl.lists`` between the gradients and the step counts) is not on its parameter's
    device, not of the dtype the optimizer keeps for it (``decl.state_dtype`` of the
    parameter's dtype: the parameter's own for torch's optimizers), and not of its shape, or,
    ``flat`` (torch's ``fused=True``, which sees each tensor flat), not of its number of
    elements. torch's functional forms would fail there too, but after writing the tensors
    before it (the for-loop form steps them; the foreach form has already incremented the
    step counts and written the first moments). Such states come from writing
    ``optimizer.state`` by hand or loading another model's state dict (``load_state_dict``
    casts and moves states but keeps their shapes). One pass over the tensors' metadata
    (``operator.attrgetter``): +1.9 to +2.2 µs per Adam parameter (two state tensors), 2–4%
    of a CPU step of 1,000 16×16 float32 parameters (``bench/state_check_cost.py``)."""
    if torch.compiler.is_compiling():  # the graph is traced (and its guards checked) before it writes
        return
    params = lists[0]
    meta = _FLAT_META if flat else _META
    expected: list[tuple] | None = None
    for name, states in zip(decl.lists[2:-1], lists[2:-1], strict=True):
        if not states:  # a state the options leave out (amsgrad off, momentum 0...)
            continue
        if expected is None:
            expected = list(map(meta, params))
            if decl.state_dtype is not None:
                expected = [(decl.state_dtype(e[0]), *e[1:]) for e in expected]
        if list(map(meta, states)) == expected and (
            not flat or list(map(Tensor.numel, states)) == list(map(Tensor.numel, params))
        ):
            continue
        for i, (p, t, want) in enumerate(zip(params, states, expected, strict=True)):
            got = meta(t)
            if got == want and t.numel() == p.numel():
                continue
            what, a, b = next(
                (w, a, b)
                for w, a, b in (("dtype", got[0], want[0]), ("device", got[1], want[1]), ("shape", t.shape, p.shape))
                if a != b
            )
            if what == "shape":
                a, b = tuple(a), tuple(b)
            raise RuntimeError(
                f"fasthist: {decl.name}: {name}[{i}] has {what} {a}, but its parameter (params[{i}]) asks for "
                f"{what} {b}; nothing was stepped (was optimizer.state written by hand, or another model's state "
                "dict loaded?)"
            )


def run(backend: str, decl: OptimizerDecl, lists: list[list[Tensor]], hist: HistTarget | None, kwargs: dict) -> None:
    """Run one per-device call of ``decl`` on ``backend`` (module docstring). The torch
    backends run the optimizer's torch functional, which keeps its own step counts; the
    others get their inputs readied by :func:`stepped`."""
    if backend == TRITON:
        kernel = kernel_function(decl)
        assert kernel is not None, "the dispatcher chose a kernel that does not import"
        local = local_lists(lists)
        stepped(lists, kwargs, local[0][0].device, lambda ready: kernel(*local, hist=hist, **ready))
    elif backend == FUSED_CPU:
        assert decl.fused_cpu is not None and hist is not None
        stepped(lists, kwargs, torch.device("cpu"), lambda ready: csrc.fused_step_(decl, lists, hist, ready))
    else:
        accumulate = _compiled_histogram_ if backend == CPU_HISTOGRAM else accumulate_

        def update() -> None:
            decl.update(*lists, **kwargs)
            record_(
                hist, decl.hist_inputs, lists, kwargs, sqrt=decl.sqrt, reciprocal=decl.reciprocal, accumulate=accumulate
            )

        record_staleness_(hist, decl, lists, kwargs, update, accumulate)


def stepped(
    lists: list[list[Tensor]], kwargs: dict[str, Any], device: torch.device, step: Callable[[dict[str, Any]], None]
) -> None:
    """torch's fused-step protocol (its ``_fused_*`` functionals), written once around
    ``step``, a backend that takes ready inputs:

    - ``state_steps += 1`` before the step, ``state_steps -= found_inf`` after it; a ``step``
      that raises has its increment undone (the backends check every tensor before they
      write one; a fault in the middle of a kernel leaves what it wrote);
    - ``found_inf`` and ``grad_scale``: None, or one value on ``device``, where the backend
      reads it (``found_inf`` nonzero: the backend leaves parameters, states and histograms
      untouched, with no host sync). With the step counts on the host and ``found_inf`` on
      another device, the flag is read here instead (a sync; torch's GradScaler syncs there
      too): a nonzero flag skips the whole call, step counts included;
    - a tensor ``lr``: one value, detached, on its own device (each backend reads it where
      torch computes with it: the host, or the device when the step counts live there).

    ``step`` gets ``kwargs`` with these replaced."""
    steps = lists[-1]
    found_inf, grad_scale, lr = kwargs.get("found_inf"), kwargs.get("grad_scale"), kwargs.get("lr")
    ready = dict(kwargs)
    with torch.no_grad():
        if found_inf is not None and not found_inf.is_cpu and all(s.is_cpu for s in steps):
            if float(found_inf.item()) != 0.0:  # host step counts cannot be rolled back on the device
                return
            found_inf = None
        if found_inf is not None:
            found_inf = found_inf.to(device=device, non_blocking=True).reshape(())
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=device, non_blocking=True).reshape(())
        if isinstance(lr, Tensor):  # one value (:func:`check`)
            ready["lr"] = lr.detach().reshape(())
        for key, value in (("found_inf", found_inf), ("grad_scale", grad_scale)):
            if key in kwargs:
                ready[key] = value
        torch._foreach_add_(steps, 1)
        try:
            step(ready)
        except BaseException:
            torch._foreach_sub_(steps, 1)
            raise
        if found_inf is not None:
            flag = found_inf.to(steps[0].device)
            torch._foreach_sub_(steps, [flag] * len(steps))
