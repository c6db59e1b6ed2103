"""The one place that decides which backend (:mod:`fasthist.backend`) runs a call, and says why.

Per device, the call goes to the fastest backend that takes it, in this order:

1. :data:`~fasthist.backend.TRITON`, when asked for (``FASTHIST_BACKEND=triton``) or on
   CUDA tensors (``auto``) where ``fasthist.kernels`` imports, unless the kernel cannot take
   the call: more bins than :data:`fasthist.kernels.MAX_BINS` (one warning per layout),
   ``differentiable``, sparse gradients, betas held in device tensors (reading them would
   synchronise), parameter dtypes it has no kernel for (``decl.kernel_dtypes``), a target
   with staleness windows where the optimizer's kernel has no staleness
   (``fasthist.kernels.tracks_staleness``);
2. :data:`~fasthist.backend.FUSED_CPU` for a tracked ``fused=True`` call of an optimizer
   with a fused CPU op, on one float32/bfloat16/float16 dtype of plain contiguous CPU
   tensors with scalar hyper-parameters (``lr`` and the GradScaler's tensors on the CPU),
   and no staleness windows unless ``fasthist.csrc.TRACKS_STALENESS`` names its op;
3. :data:`~fasthist.backend.CPU_HISTOGRAM` for a tracked call on the CPU whose states the
   compiled pass bins (float32, bfloat16, float16 and complex64 ones);
4. :data:`~fasthist.backend.TORCH` otherwise, and everywhere with ``FASTHIST_BACKEND=reference``.

Before the Triton kernel first runs a specialisation it is self-tested against 4 on the
same device (:mod:`fasthist.selftest`): a mismatch runs it with ``tl.histogram``, or turns
1 down. ``FASTHIST_CPU_KERNEL=0`` turns 2 and 3 down. Each call's choice is a :class:`Choice`: the
backend, and why each faster one was turned down; the optimizer keeps the latest per
(group, device, dtype) (``opt.backends()``). A step chooses and checks every call
(:func:`plan`, which writes nothing) before it runs any (:func:`execute`).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import backend, compiled, csrc, selftest
from .backend import CPU_HISTOGRAM, FUSED_CPU, TORCH, TRITON
from .declaration import OptimizerDecl
from .dtensor import is_dtensor
from .target import DeviceTargets, HistTarget

__all__ = ["Call", "Choice", "choose", "execute", "plan", "run"]


class Choice(NamedTuple):
    """The backend that ran a call, why the faster ones did not (empty: none was faster), and
    for the Triton backend the histogram strategy its launch used (``"shared"``,
    ``"tl.histogram"``, or ``"words"``, the shared strategy's twin under the interpreter;
    empty for the other backends, whose histogram is their own pass)."""

    backend: str
    reason: str
    strategy: str = ""


Record = dict[tuple[int, torch.device, torch.dtype], Choice]


class Call(NamedTuple):
    """One per-device call of a step, checked and with its backend chosen (:func:`plan`):
    the device, the functional form's lists restricted to it, its histogram target (or
    None) and the :class:`Choice`."""

    device: torch.device
    lists: list[list[Tensor]]
    target: HistTarget | None
    choice: Choice


def plan(
    decl: OptimizerDecl, lists: list[list[Tensor]], hist: DeviceTargets | None, kwargs: dict[str, Any]
) -> list[Call]:
    """The per-device calls of one functional call of ``decl``, each with the backend
    :func:`choose` picks and its inputs checked (:func:`fasthist.backend.check`). Writes no
    tensor: everything that refuses bad input raises here, so a step plans every group
    before it runs any (:meth:`fasthist.optimizer.HistogramMixin.step`)."""
    params = lists[0]
    if not params:
        return []
    if hist is None:
        devices: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            devices.setdefault(p.device, []).append(i)
        parts = [(dev, idx, None) for dev, idx in devices.items()]
    else:
        parts = [(dev, idx, target) for dev, (idx, target) in hist.items()]
    calls = []
    for device, idx, target in parts:
        sub = lists if len(parts) == 1 else [[lst[i] for i in idx] if lst else lst for lst in lists]
        choice = choose(decl, device, sub, target, kwargs)
        backend.check(choice.backend, decl, device, sub, kwargs)
        calls.append(Call(device, sub, target, choice))
    return calls


def check_ahead(decl: OptimizerDecl, calls: list[Call]) -> None:
    """Check the tensors of every call of a step after its first (in the order they run),
    before any runs, for the backends that check them only when they run (the Triton
    kernels' and the compiled CPU op's checks come before they write, but after the calls
    before them wrote): a state not of its parameter's dtype, device or number of elements
    raises here (:func:`fasthist.backend.check_states`). A step of one call (one group on one
    device) pays nothing; torch's functional forms are checked in :func:`plan` always."""
    for call in calls[1:]:
        if call.choice.backend in (TRITON, FUSED_CPU):
            backend.check_states(decl, call.lists, flat=True)


def execute(
    decl: OptimizerDecl, calls: list[Call], kwargs: dict[str, Any], *, record: Record | None = None, group: int = 0
) -> None:
    """Run the calls :func:`plan` made (under ``torch.compile`` as one opaque operator where
    the backend cannot be traced, :mod:`fasthist.compiled`). ``record`` (when given) gets
    each call's :class:`Choice` under ``(group, device, dtype)``, for every parameter dtype
    of the call, once the call has run."""
    compiling = torch.compiler.is_compiling()
    for device, sub, target, choice in calls:
        if compiling and (choice.backend == TRITON or (decl.opaque_update and choice.backend != FUSED_CPU)):
            compiled.functional_(decl, choice.backend, sub, target, kwargs)  # one graph node
            continue
        with selftest.histogram(choice.reason if choice.backend == TRITON else None):
            backend.run(choice.backend, decl, sub, target, kwargs)
        if record is not None and not compiling:
            if choice.backend == TRITON and target is not None:
                choice = choice._replace(strategy=target.marks.get(HistTarget.STRATEGY, ""))
            for dtype in {p.dtype for p in sub[0]}:
                record[(group, device, dtype)] = choice


def run(
    decl: OptimizerDecl,
    lists: list[list[Tensor]],
    hist: DeviceTargets | None,
    kwargs: dict[str, Any],
    *,
    record: Record | None = None,
    group: int = 0,
) -> None:
    """One functional call of ``decl``: :func:`plan` (every device's call chosen and
    checked, nothing written), then :func:`execute`."""
    execute(decl, plan(decl, lists, hist, kwargs), kwargs, record=record, group=group)


def choose(
    decl: OptimizerDecl, device: torch.device, lists: list[list[Tensor]], hist: HistTarget | None, kwargs: dict
) -> Choice:
    """The backend for one per-device call, and why each faster one was turned down."""
    requested = backend.requested()
    refused: list[str] = []
    for name, refusal in (
        (TRITON, _triton_refusal),
        (FUSED_CPU, _fused_cpu_refusal),
        (CPU_HISTOGRAM, _cpu_histogram_refusal),
    ):
        why = refusal(requested, decl, device, lists, hist, kwargs)
        if why is None and name == TRITON:  # first use of a specialisation: is it right here?
            note = selftest.check(decl, device, lists, hist, kwargs)
            if note is None or note == selftest.TL_NOTE:
                return Choice(name, note or "")
            why = note
        if why is None:
            return Choice(name, "; ".join(refused))
        if why:  # "" : not a candidate here at all, nothing worth saying
            refused.append(f"{name}: {why}")
    return Choice(TORCH, "; ".join(refused))


_WARNED: set = set()


def _triton_refusal(
    requested: str, decl: OptimizerDecl, device: torch.device, lists: list[list[Tensor]], hist: Any, kwargs: dict
) -> str | None:
    """None when the Triton kernel takes the call, else why not ("" where it was never a candidate)."""
    if requested in ("torch", "reference"):
        return f"FASTHIST_BACKEND={requested}"
    if decl.kernel is None:
        return f"{decl.name} has no Triton kernel"
    if requested == "auto" and device.type != "cuda":
        return ""
    kernels = backend.kernels_module(interpret=requested == "triton" and device.type != "cuda")
    if kernels is None:
        if requested == "triton":
            raise RuntimeError(
                f"FASTHIST_BACKEND=triton, but fasthist.kernels could not be imported: {backend.kernels_error()}"
            )
        return f"fasthist.kernels does not import ({backend.kernels_error()})"
    if requested == "triton" and device.type != "cuda" and not backend.interpreting():
        raise RuntimeError(
            f"FASTHIST_BACKEND=triton on {device.type} tensors needs TRITON_INTERPRET=1 set before "
            "fasthist.kernels is first imported"
        )
    if backend.kernel_function(decl) is None:
        return f"fasthist.kernels.{decl.kernel[0]} does not import"
    if hist is not None and hist.staleness is not None and not kernels.tracks_staleness(decl.kernel[0]):
        return STALENESS_NOT_HERE
    return _kernel_refusal(decl, kernels.MAX_BINS, lists, hist, kwargs)


STALENESS_NOT_HERE = "staleness: not in this backend yet"


def _staleness_refusal(decl: OptimizerDecl, hist: HistTarget | None, module: Any) -> str | None:
    """Why the fused CPU op cannot write the staleness windows of ``hist``, or None: it has
    them and ``module.TRACKS_STALENESS`` (the ops that bin it) does not name ``decl``'s op."""
    if hist is None or hist.staleness is None:
        return None
    if decl.fused_cpu is not None and decl.fused_cpu.op in getattr(module, "TRACKS_STALENESS", ()):
        return None
    return STALENESS_NOT_HERE


def _kernel_refusal(
    decl: OptimizerDecl, max_bins: int, lists: list[list[Tensor]], hist: Any, kwargs: dict
) -> str | None:
    """What of this call the kernel cannot take (rule 1 of the module docstring), or None."""
    if hist is not None and hist.bins.num_bins > max_bins:
        if hist.bins not in _WARNED:
            _WARNED.add(hist.bins)
            warnings.warn(
                f"fasthist: {hist.bins} has {hist.bins.num_bins} bins, more than the fused kernels take "
                f"({max_bins}); these groups run on another backend (see opt.backends())",
                stacklevel=6,
            )
        return f"{hist.bins.num_bins} bins, more than the kernels take ({max_bins})"
    if kwargs.get("differentiable"):
        return "differentiable=True"
    if kwargs.get("has_sparse_grad") or any(g.is_sparse for g in lists[1]):
        return "sparse gradients"
    if any(isinstance(kwargs.get(k), Tensor) and kwargs[k].device.type != "cpu" for k in ("beta1", "beta2")):
        return "betas held in device tensors"
    if not all(p.dtype in decl.kernel_dtypes for p in lists[0]):
        refused = sorted({str(p.dtype) for p in lists[0] if p.dtype not in decl.kernel_dtypes})
        return f"no {decl.name} kernel for {', '.join(refused)} parameters"
    return None


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# what the compiled histogram pass bins: complex ones as (re, im) pairs
_HISTOGRAM_DTYPES = frozenset(_FUSED_DTYPES + (torch.complex64, torch.complex32))


def _plain_cpu(tensors: list[Tensor], dtype: torch.dtype) -> bool:
    """Every tensor dense, contiguous, on the CPU, of ``dtype`` (the layout before
    ``is_contiguous()``, which a sparse tensor does not answer). Runs over every tensor of
    every step, so it reads four cheap attributes and nothing else: DTensors are turned down
    by their parameters (their states and gradients are DTensors too), and ``requires_grad``
    states only exist with ``differentiable``, turned down before."""
    return all(t.is_cpu and t.dtype == dtype and t.layout == torch.strided and t.is_contiguous() for t in tensors)


def _plain_windows(hist: HistTarget) -> bool:
    """Both windows int64 CPU rows the compiled passes write in place."""
    return all(
        w.is_cpu and w.dtype == torch.int64 and w.dim() == 2 and w.stride(1) == 1 for w in (hist.step, hist.total)
    )


def _cpu_passes_refusal(requested: str, hist: HistTarget | None) -> str | None:
    """Why neither compiled CPU pass can run ("" where they are not candidates), or None."""
    if hist is None or hist.step.device.type != "cpu":
        return ""
    if requested == "reference":
        return "FASTHIST_BACKEND=reference"
    if not csrc.enabled():
        return "FASTHIST_CPU_KERNEL=0"
    if not _plain_windows(hist):
        return "histogram windows not plain int64 rows"
    if not csrc.available():
        return "the compiled CPU library did not load (see its warning)"
    return None


def _fused_cpu_refusal(
    requested: str, decl: OptimizerDecl, device: torch.device, lists: list[list[Tensor]], hist: Any, kwargs: dict
) -> str | None:
    """None when the compiled fused step takes this ``fused=True`` call (rule 2 of the
    module docstring), else why not ("" for a call that did not ask for it)."""
    if not kwargs.get("fused") or decl.fused_cpu is None:
        return ""
    passes = _cpu_passes_refusal(requested, hist)
    passes = _staleness_refusal(decl, hist, csrc) if passes is None else passes
    if passes is not None:
        return passes
    if kwargs.get("differentiable") or kwargs.get("has_sparse_grad"):
        return "differentiable or sparse"
    if any(isinstance(kwargs.get(k), Tensor) for k in decl.floats - {"lr"}):
        return "tensor hyper-parameters"
    lr = kwargs.get("lr")
    scalars = [lr if isinstance(lr, Tensor) else None, kwargs.get("grad_scale"), kwargs.get("found_inf")]
    if any(t is not None and (t.device.type != "cpu" or t.numel() != 1) for t in scalars):
        return "lr, grad_scale or found_inf not a one-element CPU tensor"
    params, steps = lists[0], lists[-1]
    dtype = params[0].dtype
    if dtype not in _FUSED_DTYPES or any(is_dtensor(p) for p in params):
        return f"{dtype} or DTensor parameters"
    if not all(_plain_cpu(lst, dtype) for lst in lists[:-1]) or not all(s.is_cpu and s.numel() == 1 for s in steps):
        return "tensors of mixed dtypes, not contiguous, or step counts off the CPU"
    return None


def _cpu_histogram_refusal(
    requested: str, decl: OptimizerDecl, device: torch.device, lists: list[list[Tensor]], hist: Any, kwargs: dict
) -> str | None:
    """None when the compiled CPU histogram pass takes this call's histogram (module
    docstring, rule 3), else why not ("" where there is no CPU histogram to take)."""
    passes = _cpu_passes_refusal(requested, hist)
    if passes is not None:
        return passes
    states = [t for lst in lists[2:-1] for t in lst]
    if not all(t.dtype in _HISTOGRAM_DTYPES and t.is_cpu for t in states):
        return "states of a dtype it does not bin (float64: torch ops bin those in float64)"
    return None
