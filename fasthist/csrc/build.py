"""How the compiled CPU kernel is built: the sources and flags, shared by ``setup.py`` (built
at install, where torch is importable in the build environment) and the first-use build of
:mod:`fasthist.csrc` (one compiler call, cached); and the stamp that says a library file is
such a build.

The stamp, ``<library>.stamp`` beside each library either build writes, holds the
:func:`cache_key` of the build (sources, flags, torch, interpreter) and the library's size
and SHA-256. It is written after the library is complete, under a temporary name and
renamed, so a library without a matching stamp is one that must not be loaded: built from
other sources (an older checkout's ``fasthist/_C_cpu*.so``), for another torch, or not the
whole file (truncated, emptied, overwritten); :func:`stamp_matches` reads the file, never
loads it.

Imports nothing from fasthist and torch only inside functions: ``setup.py`` loads this file
by path, before fasthist is installed.

Flags: ``-O3`` vectorises the binning loop (one clone per x86-64 level, picked at load
time); ``-fno-math-errno`` lets ``sqrt`` vectorise and changes no result. Nothing that
changes a rounding (``-ffast-math``, ``-freciprocal-math``, ``-ffp-contract=fast`` across
the division) is allowed: the bins must be the reference's exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile

__all__ = [
    "CXX_FLAGS",
    "HEADERS",
    "NAME",
    "SOURCES",
    "build",
    "cache_key",
    "compile_command",
    "openmp_flags",
    "stamp_matches",
    "write_stamp",
]

NAME = "_C_cpu"  # fasthist._C_cpu: the library a setup.py build puts beside the package
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, name) for name in ("op_args.cpp", "histogram.cpp", "fused_adam.cpp", "fused_adagrad.cpp")]
HEADERS = [
    os.path.join(HERE, name)
    for name in ("log_bins.h", "dtype_io.h", "private_hist.h", "windows.h", "sweep.h", "op_args.h")
]
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-std=c++20", "-w"]


def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's own parallel backend is OpenMP (its Linux wheels): ATen's
    ``at::parallel_for`` is an inline ``#pragma omp parallel``, so without the flag every
    sweep runs on one thread. Linked against the ``libgomp.so.1`` torch ships (its lib
    directory comes first in ``-L``), so the process keeps one OpenMP runtime and one pool."""
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def compile_command(output: str) -> list[str]:
    """One compiler call that builds ``output`` (a shared library of torch ops) for the torch
    this interpreter imports."""
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = os.environ.get("CXX", "c++")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return (
        [cxx, "-shared", "-fPIC", *CXX_FLAGS, *openmp_flags(), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        + [f"-I{p}" for p in include_paths()]
        + SOURCES
        + ["-o", output]
        + [f"-L{p}" for p in library_paths()]
        + [f"-Wl,-rpath,{p}" for p in library_paths()]
        + ["-lc10", "-ltorch_cpu"]
    )


def cache_key() -> str:
    """Changes with the sources, the flags, the torch build and the interpreter."""
    import torch

    h = hashlib.sha256()
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join(CXX_FLAGS + openmp_flags()).encode())
    h.update(f"{torch.__version__} {torch.version.git_version} {sys.version} {sysconfig.get_platform()}".encode())
    h.update(os.environ.get("CXX", "c++").encode())
    return h.hexdigest()[:16]


def _digest(path: str) -> dict[str, int | str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def write_stamp(library: str) -> None:
    """Stamp ``library`` (complete, just built from these sources) as such a build; written
    under a temporary name and renamed, so a reader sees a whole stamp or none."""
    fd, tmp = tempfile.mkstemp(suffix=".stamp", dir=os.path.dirname(library) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"key": cache_key(), **_digest(library)}, f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide an installed library's stamp from other users
        os.replace(tmp, library + ".stamp")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def stamp_matches(library: str) -> bool:
    """Whether ``library`` is the whole, unchanged build of these sources for this torch
    and interpreter: its stamp's key is :func:`cache_key`, and its size and SHA-256 are the
    stamp's (a few milliseconds; the file is read, not loaded)."""
    try:
        with open(library + ".stamp") as f:
            stamp = json.load(f)
        if not isinstance(stamp, dict) or stamp.get("key") != cache_key():
            return False
        return stamp.get("size") == os.path.getsize(library) and stamp == {"key": stamp["key"], **_digest(library)}
    except (OSError, ValueError):
        return False


def build(directory: str) -> str:
    """Compile into ``directory`` (created) unless a library stamped as this build is
    already there; returns the library's path. Written under a temporary name and renamed,
    then stamped, so concurrent builds never load half a file, and a cached library that is
    not whole (truncated, emptied) is built again. Raises ``RuntimeError`` with the
    compiler's output when the build fails."""
    path = os.path.join(directory, f"fasthist_cpu_{cache_key()}.so")
    if stamp_matches(path):
        return path
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        try:
            proc = subprocess.run(compile_command(tmp), capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:  # no compiler at all, or it hung
            raise RuntimeError(f"{type(e).__name__}: {e}") from e
        if proc.returncode != 0:
            raise RuntimeError(f"the compiler failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        os.replace(tmp, path)
        write_stamp(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
