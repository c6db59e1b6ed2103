"""Backend selection: which implementation runs a (device, dtype) group of tensors.

``FASTHIST_BACKEND`` (read at every step, so tests can flip it) is one of:

- ``auto`` (default): Triton kernels for CUDA tensors when Triton and ``fasthist.kernels``
  are importable, the pure-PyTorch reference everywhere else;
- ``torch``: the reference everywhere;
- ``triton``: the kernels everywhere; on CPU tensors they run under Triton's interpreter
  (``TRITON_INTERPRET=1``, set here before Triton compiles anything), which is how CI
  tests them without a GPU.

On CPU tensors the reference's histogram pass is compiled C++ where it builds
(:mod:`fasthist.csrc`; ``FASTHIST_CPU_KERNEL=0`` turns it off): the same bins, one sweep.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

__all__ = ["select_backend", "kernels_module", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")
_kernels: ModuleType | None = None
_kernels_error: BaseException | None = None


def requested_backend() -> str:
    value = os.environ.get("FASTHIST_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"Invalid FASTHIST_BACKEND: {value!r}; expected one of {', '.join(BACKENDS)}")
    return value


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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``; raises when Triton is forced
    but cannot run there."""
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if device.type == "cuda" and kernels_module() is not None:
            return "triton"
        return "torch"
    # forced triton
    mod = kernels_module(interpret=device.type != "cuda")
    if mod is None:
        raise RuntimeError(f"FASTHIST_BACKEND=triton, but fasthist.kernels could not be imported: {_kernels_error}")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"FASTHIST_BACKEND=triton on {device.type} tensors needs TRITON_INTERPRET=1 set before "
            "fasthist.kernels is first imported"
        )
    return "triton"
