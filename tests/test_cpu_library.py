"""Which compiled CPU library fasthist loads (fasthist/csrc/library.py, build.py): only one
stamped as the whole build of these sources, for this torch and interpreter. A library left
by an older checkout, or a cached one that is truncated, empty or garbage, is never loaded
(loading registers its ops for the life of the process, and a truncated one kills it with
SIGBUS); the cached one is built again instead.

Each load runs in a fresh interpreter (a process loads the library once, for good), whose
"compiler" copies the library this process loaded: a build of these very sources, so no
test here waits for a real compile.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from fasthist import csrc
from fasthist.csrc import build

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")

# Loads the library in a fresh interpreter: argv = [valid library, a library to offer as the
# one installed beside the package, or ""]. Prints where it was loaded from and whether the
# "compiler" ran.
_LOAD = """
import glob, json, sys, warnings
from fasthist.csrc import build, library

valid, installed = sys.argv[1], sys.argv[2]
compiled = []
build.compile_command = lambda out: compiled.append(out) or ["cp", valid, out]
if installed:
    library.glob = type(glob)("glob")
    library.glob.glob = lambda pattern: [installed]
with warnings.catch_warnings():
    warnings.simplefilter("error")
    ops = library.load()
print(json.dumps({"path": library.library_path(), "compiled": bool(compiled), "op": hasattr(ops, "histogram_")}))
"""


@pytest.fixture(scope="module")
def valid() -> str:
    assert csrc.available(), "the library must build here for these tests"
    path = csrc.library_path()
    assert build.stamp_matches(path)
    return path


def load_fresh(tmp_path, valid: str, installed: str = "") -> dict:
    env = {**os.environ, "FASTHIST_CACHE": str(tmp_path / "cache"), "FASTHIST_CPU_KERNEL": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD, valid, installed], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cached_path(tmp_path) -> str:
    return os.path.join(str(tmp_path / "cache"), "cpu", f"fasthist_cpu_{build.cache_key()}.so")


def test_cached_build_is_reused(tmp_path, valid):
    """The first load builds and stamps; the next one loads that build without compiling."""
    first = load_fresh(tmp_path, valid)
    assert first == {"path": cached_path(tmp_path), "compiled": True, "op": True}
    assert build.stamp_matches(cached_path(tmp_path))
    assert load_fresh(tmp_path, valid) == {**first, "compiled": False}


def _no_stamp(path: str) -> None:  # a library an older checkout's setup.py build left
    os.remove(path + ".stamp")


def _other_sources(path: str) -> None:  # stamped, but as the build of other sources
    with open(path + ".stamp") as f:
        stamp = json.load(f)
    with open(path + ".stamp", "w") as f:
        json.dump({**stamp, "key": "0" * 16}, f)


def _rebuilt_in_place(path: str) -> None:  # the stamp of these sources, the library of others
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def stamped_copy(valid: str, path: str) -> str:
    """``valid`` copied to ``path`` and stamped, as a build writes it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copy(valid, path)
    build.write_stamp(path)
    return path


def installed_copy(tmp_path, valid: str) -> str:
    return stamped_copy(valid, str(tmp_path / "fasthist" / "_C_cpu.cpython-311-x86_64-linux-gnu.so"))


def test_installed_library_is_loaded(tmp_path, valid):
    """A library beside the package stamped as the build of these sources comes first."""
    installed = installed_copy(tmp_path, valid)
    assert load_fresh(tmp_path, valid, installed) == {"path": installed, "compiled": False, "op": True}


@pytest.mark.parametrize("stale", [_no_stamp, _other_sources, _rebuilt_in_place], ids=lambda f: f.__name__[1:])
def test_stale_installed_library_is_never_loaded(tmp_path, valid, stale):
    """A library beside the package that is not stamped as the build of these sources is
    passed over: the cached build is loaded instead."""
    installed = installed_copy(tmp_path, valid)
    stale(installed)
    got = load_fresh(tmp_path, valid, installed)
    assert got == {"path": cached_path(tmp_path), "compiled": True, "op": True}


def _truncated(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty(path: str) -> None:
    open(path, "wb").close()


def _garbage(path: str) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(4096))


@pytest.mark.parametrize("damage", [_truncated, _empty, _garbage, _no_stamp], ids=lambda f: f.__name__[1:])
def test_damaged_cached_library_is_rebuilt(tmp_path, valid, damage):
    """A cached library that is not whole (truncated: loading it would kill the process with
    SIGBUS; empty or garbage: it would not load, in this process or any later one) or not
    stamped (a cache an older fasthist wrote) is built again, then loaded."""
    damage(stamped_copy(valid, cached_path(tmp_path)))
    assert load_fresh(tmp_path, valid) == {"path": cached_path(tmp_path), "compiled": True, "op": True}
    assert build.stamp_matches(cached_path(tmp_path))


def test_stamp_says_whole_and_same(tmp_path, valid, monkeypatch):
    """The stamp binds the file (size and SHA-256) to the key of the sources it was built from."""
    lib = str(tmp_path / "lib.so")
    shutil.copy(valid, lib)
    assert not build.stamp_matches(lib)  # no stamp
    build.write_stamp(lib)
    assert build.stamp_matches(lib)
    monkeypatch.setattr(build, "cache_key", lambda: "1" * 16)  # the sources changed
    assert not build.stamp_matches(lib)
    monkeypatch.undo()
    _rebuilt_in_place(lib)
    assert not build.stamp_matches(lib)
