"""The fused tracked CPU steps (``fused_*.cpp``): ``fused=True`` on CPU tensors, the update
and the histogram of the value it computes in one parallel sweep.

:func:`fused_step_` runs a call :mod:`fasthist.dispatch` chose it for (what the
dispatcher turns down runs torch's fused step, then a histogram pass), through the operator
the optimizer's declaration names (:class:`fasthist.declaration.FusedCpuDecl`), with its
arguments built from that declaration: nothing here names an optimizer.
Both states and parameters are torch's fused CPU step's (bit-identical where torch's CPU
kernels are AVX512 or AVX2, see the ``.cpp`` files); the bins are the reference's exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..declaration import OptimizerDecl
from ..target import HistTarget

__all__ = ["fused_step_"]

# read once: torch picks its kernels' ISA at startup (ATEN_CPU_CAPABILITY), and a call to
# get_cpu_capability() inside a compiled step is a graph break (it returns a str)
_X86_KERNELS = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2")


def fused_step_(decl: OptimizerDecl, lists: list[list[Tensor]], hist: HistTarget, kwargs: dict[str, Any]) -> None:
    """One fused tracked step of ``decl`` through its operator (``decl.fused_cpu``,
    :class:`fasthist.declaration.FusedCpuDecl`) on ``lists`` (the
    functional form's lists), as torch's ``_fused_*_`` ops do it: ``found_inf == 1`` leaves
    parameters and states untouched (any nonzero value the histogram windows). The call must
    be one :mod:`fasthist.dispatch` gave it (contiguous CPU tensors of one
    float32/bfloat16/float16 dtype, scalar hyper-parameters), readied by
    :func:`fasthist.backend.stepped`: the step counts already incremented (and decremented
    by ``found_inf`` after).

    The operator takes the lists in order (the parameters detached), then by keyword:
    ``lr`` (a float, or 0.0 beside ``lr_tensor``), ``grad_scale``, ``found_inf``, each of
    its ``options`` under its own name (a bool for one of ``decl.bools``, a float for one of
    ``decl.floats``), ``tail_mod`` (its ``x86_tail`` with torch's x86 kernels, else 0) and
    the histogram target (its bins' layout, its rows and windows), and the target's
    staleness windows (``stale_step``, ``stale_total``) when it has them: only an op named in
    ``fasthist.csrc.TRACKS_STALENESS`` takes them (the dispatcher sends no other such call)."""
    fused, lr, bins = decl.fused_cpu, kwargs["lr"], hist.bins
    assert fused is not None  # the dispatcher picks this backend only for a declared op
    options = {name: bool(kwargs.get(name)) if name in decl.bools else float(kwargs[name]) for name in fused.options}
    if hist.staleness is not None:  # only for the ops of TRACKS_STALENESS (fasthist.dispatch)
        options["stale_step"], options["stale_total"] = hist.staleness
    with torch.no_grad():
        getattr(torch.ops.fasthist, fused.op)(
            [p.detach() for p in lists[0]],
            *lists[1:],
            lr=0.0 if isinstance(lr, Tensor) else float(lr),
            lr_tensor=lr if isinstance(lr, Tensor) else None,
            grad_scale=kwargs.get("grad_scale"),
            found_inf=kwargs.get("found_inf"),
            tail_mod=fused.x86_tail if _X86_KERNELS else 0,
            shift=bins.shift,
            low_key=bins.low_key,
            num_log_bins=bins.num_log_bins,
            rows=hist.rows,
            step=hist.step,
            total=hist.total,
            **options,
        )
