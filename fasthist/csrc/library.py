"""Finding, checking, building and loading the compiled CPU library of :mod:`fasthist.csrc`.

The library is, in order: the one a ``setup.py`` build put beside the package (installed
with torch in the build environment, ``pip install --no-build-isolation``), else one
compiled on first use into a cache (``$FASTHIST_CACHE``, default
``$XDG_CACHE_HOME/fasthist`` or ``~/.cache/fasthist``; one compiler call). Where neither
works, the torch-op path runs, with one warning saying why. ``FASTHIST_CPU_KERNEL=0`` turns
it off.

A library is loaded only when its stamp (see :mod:`fasthist.csrc.build`) says it is the
whole, unchanged build of these very sources, flags, torch and interpreter: loading one
registers its ops for the life of the process, so the check runs before, never after. An
installed library that fails it (left by an older checkout, a torch upgrade, a truncated
copy) is passed over for the cached build; a cached one that fails it is rebuilt.
"""

from __future__ import annotations

import glob
import os
import threading
import warnings
from typing import Any

import torch

from . import build as _build

__all__ = ["available", "enabled", "library_path", "load"]

_lock = threading.Lock()
_ops: Any = None
_path: str | None = None
_error: str | None = None


def enabled() -> bool:
    """False when ``FASTHIST_CPU_KERNEL`` is ``0`` (read at every step, so tests can flip it)."""
    return os.environ.get("FASTHIST_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def _installed() -> str | None:
    """The library a setup.py build put beside the package, if it is one of these sources."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(package, f"{_build.NAME}.*so")))
    return next((path for path in found if _build.stamp_matches(path)), None)


def _cache_dir() -> str:
    root = os.environ.get("FASTHIST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fasthist"
    )
    return os.path.join(root, "cpu")


def load() -> Any:
    """``torch.ops.fasthist``, loading (or building) the library once per process; None,
    with one warning, when that fails."""
    global _ops, _path, _error
    if _ops is not None or _error is not None:
        return _ops
    with _lock:
        if _ops is None and _error is None:
            try:
                path = _installed() or _build.build(_cache_dir())
                torch.ops.load_library(path)
                _register_fake()
                _ops, _path = torch.ops.fasthist, path
            except Exception as e:  # no compiler, a failed build, a library that does not load
                _error = f"{type(e).__name__}: {e}"
                warnings.warn(
                    "fasthist: the compiled CPU histogram is unavailable, so CPU steps histogram with "
                    f"torch ops (slower; set FASTHIST_CPU_KERNEL=0 to silence this). Reason: {_error}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _ops


def _register_fake() -> None:
    """Fake (meta) kernels, so torch.compile can trace a step that calls the ops: they only
    write their tensors and windows in place, and return nothing."""
    if getattr(torch.library, "register_fake", None) is None:  # torch < 2.4: no compile support
        return

    @torch.library.register_fake("fasthist::histogram_")
    def _fake(
        values,
        scale,
        found_inf,
        sqrt,
        reciprocal,
        shift,
        low_key,
        num_log_bins,
        rows,
        step,
        total,
        spans=None,
        spans_valid=False,
    ):
        return None

    @torch.library.register_fake("fasthist::fused_adam_hist_")
    def _fake_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs):
        return None

    @torch.library.register_fake("fasthist::fused_adagrad_hist_")
    def _fake_adagrad(params, grads, state_sums, state_steps, **kwargs):
        return None


def available() -> bool:
    """Whether the compiled library is loaded (building it on first call if needed)."""
    return load() is not None


def library_path() -> str | None:
    """Path of the loaded library, or None."""
    load()
    return _path
