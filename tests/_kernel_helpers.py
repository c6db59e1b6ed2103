"""Helpers shared by the kernel tests: the device they run on, ulp tolerances, bitwise
equality and a histogram target with permuted rows.

Importing this module sets ``TRITON_INTERPRET=1`` on a machine without CUDA, so it must be
imported before ``fasthist.kernels`` is (the interpreter is chosen at Triton's import).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fasthist.bins import LogBins  # noqa: E402
from fasthist.target import HistTarget  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEVICE.type == "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BINS = LogBins()


def ulp(x: Tensor) -> Tensor:
    """ulp of |x| in x's dtype, as float64."""
    bits = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}[x.dtype]
    _, e = torch.frexp(x.double().abs())
    tiny = {torch.float32: -149, torch.bfloat16: -133, torch.float16: -24}[x.dtype]
    return torch.ldexp(torch.ones_like(e, dtype=torch.float64), torch.clamp(e - bits, min=tiny))


def assert_ulp(
    actual: Tensor,
    expected: Tensor,
    n: float,
    what: str,
    previous: Tensor | None = None,
    *,
    previous_scales: bool = False,
    slack: float | Tensor = 0.0,
) -> None:
    """|actual - expected| <= n ulp of max(|expected|, |expected - previous|) (+ ``slack``):
    an update larger than the value carries its own rounding (torch's CPU sqrt is 1 ulp
    off). ``previous_scales``: |previous| counts too (a sum that cancels keeps the rounding
    of its terms), measured in float32 ulps."""
    if actual.is_complex():
        actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
        previous = torch.view_as_real(previous) if previous is not None else None
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.numel() == 0:
        return
    diff = (actual.double() - expected.double()).abs()
    scale = expected.double().abs()
    if previous is not None:
        scale = torch.maximum(scale, (expected.double() - previous.double()).abs())
    if previous_scales:
        assert previous is not None
        scale = torch.maximum(scale, previous.double().abs())
        tol = n * ulp(scale.float()) + slack
    else:
        tol = n * ulp(scale.to(expected.dtype)) + slack
    bad = diff > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements beyond {n} ulp, max diff {diff.max().item():.3e}"


class IEEESqrt(TorchFunctionMode):
    """Inside this mode, ``sqrt``/``sqrt_`` (and their ``_foreach`` forms) of CPU float32,
    float16 and bfloat16 tensors return the correctly rounded square root; every other op is
    torch's own.

    Why: torch's CPU float32 sqrt is MKL VML's ``vsSqrt`` (ATen's ``vml::vsqrt``, used on
    every layout, even one element), which is not correctly rounded: on an AMD EPYC (AVX2)
    about 16% of results are 1 ulp from round-to-nearest, and MKL picks its code path per CPU
    at run time, so which elements are off changes from machine to machine. The root here is
    numpy's ``np.sqrt`` in float32, the IEEE 754 square root (the x86-64 ``sqrtps``
    instruction, correctly rounded by the standard on every machine); float16/bfloat16 go
    through float32 and round once more, which is still correctly rounded (24 >= 2p + 2 bits,
    p = 11 or 8). float64 and non-CPU tensors are left to torch."""

    _OPS = (torch.sqrt, torch.Tensor.sqrt, torch.Tensor.sqrt_, torch._foreach_sqrt, torch._foreach_sqrt_)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in self._OPS or kwargs:
            return func(*args, **kwargs)
        inplace = func in (torch.Tensor.sqrt_, torch._foreach_sqrt_)
        xs = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
        if not all(x.device.type == "cpu" and x.dtype in _IEEE_SQRT_DTYPES for x in xs):
            return func(*args, **kwargs)
        roots = [_sqrt_rn(x) for x in xs]
        if inplace:
            for x, r in zip(xs, roots, strict=True):
                x.copy_(r)
            return args[0]
        return roots if isinstance(args[0], (list, tuple)) else roots[0]


_IEEE_SQRT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _sqrt_rn(x: Tensor) -> Tensor:
    """The correctly rounded square root of a CPU float32/float16/bfloat16 tensor."""
    with torch.no_grad():
        root = torch.from_numpy(np.asarray(np.sqrt(x.detach().float().contiguous().numpy())))
        return root.to(x.dtype)


def ieee_sqrt(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run inside :class:`IEEESqrt` (a reference backend with torch's order of
    operations and a correctly rounded square root)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with IEEESqrt():
            return fn(*args, **kwargs)

    return wrapped


def same(a: Tensor, b: Tensor) -> bool:
    """Bit-for-bit equal values, NaN equal to NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def target(n: int) -> HistTarget:
    """A fresh target for ``n`` tensors, rows deliberately permuted: tensor i writes row n-1-i."""
    z = torch.zeros(n, BINS.num_bins, dtype=torch.int64, device=DEVICE)
    return HistTarget(BINS, z, z.clone(), torch.arange(n - 1, -1, -1, device=DEVICE))


def compile_without_a_gpu(script: str, *, timeout: int, env: dict[str, str] | None = None) -> None:
    """Run ``script`` (which compiles kernels for a GPU target and prints "ok") in a fresh
    interpreter without ``TRITON_INTERPRET``; skip where this Triton has no NVIDIA backend."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"no NVIDIA backend in this Triton: {e}")
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for k, v in (env or {}).items():
        full_env.setdefault(k, v)
    out = subprocess.run([sys.executable, "-c", script], env=full_env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def fma32(a: torch.Tensor, b: float, c: torch.Tensor) -> torch.Tensor:
    """float32 ``fma(a, b, c)``, rounded once: the product is exact in float64, TwoSum gives
    the sum's exact error, and a sum that lands exactly between two float32 values is sent
    to the side its error points to (the one case where rounding twice differs)."""
    prod = a.double() * float(torch.tensor(b, dtype=torch.float32))
    cd = c.double()
    s = prod + cd
    bb = s - prod
    err = (prod - (s - bb)) + (cd - bb)
    r = s.float()
    d = s - r.double()
    away = torch.nextafter(r, torch.where(d > 0, torch.inf, -torch.inf).float())
    tie = (d != 0) & (away.double() - s == d)  # s is the midpoint of r and away
    return torch.where(tie & (err != 0) & ((err > 0) == (d > 0)), away, r)


def assert_ran(opt: Any, *backends: str) -> None:
    """Every (group, device, dtype) call of ``opt``'s latest step ran on one of ``backends``
    (``opt.backends()``), and at least one did: a test of a kernel or of a compiled CPU pass
    fails here when the dispatcher sent its calls elsewhere, instead of comparing the
    reference with itself."""
    ran = {c.backend for c in opt.backends().values()}
    assert ran and ran <= set(backends), opt.backends()


def on_triton(launcher: Callable[..., None]) -> Callable[..., None]:
    """A kernel's launcher (``fasthist.kernels.<op>.<op>_hist``) called as the Triton backend
    calls it: :func:`fasthist.backend.stepped` increments the step counts (and rolls them
    back by ``found_inf``) and readies ``found_inf``/``grad_scale``/``lr`` around it."""
    from fasthist import backend

    def call(*lists: list[Tensor], hist: HistTarget | None, **kwargs: Any) -> None:
        device = lists[0][0].device if lists[0] else torch.device("cpu")
        backend.stepped(list(lists), kwargs, device, lambda ready: launcher(*lists, hist=hist, **ready))

    return call
