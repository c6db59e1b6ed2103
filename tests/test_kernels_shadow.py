"""The checkout's top-level ``kernels/`` folder is installed as ``fasthist.kernels``; run from
the checkout's root (``python -m pytest``, a script there), ``import kernels`` must still
give the installed top-level ``kernels`` (Hugging Face's, which transformers >= 5.25
imports), not fasthist's folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, pythonpath: Path | None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pythonpath) if pythonpath else ""}
    # -c puts the working directory (the checkout's root) first on sys.path, ahead of PYTHONPATH;
    # -S leaves site-packages out, where a real top-level kernels may be installed (transformers
    # >= 5.25 brings Hugging Face's), so that only the folder given here is one
    return subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_import_kernels_from_the_root_finds_the_installed_package(tmp_path):
    pkg = tmp_path / "kernels"
    (pkg / "layers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .layers import NAME\nWHO = 'installed'\n")
    (pkg / "layers" / "__init__.py").write_text("NAME = 'layers'\n")
    out = _run(
        "import sys, kernels, kernels.layers; "
        "print(kernels.WHO, kernels.NAME, kernels.layers.__name__, kernels.__file__, 'kernels._shadow' in sys.modules)",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["installed", "layers", "kernels.layers", str(pkg / "__init__.py"), "False"]


def test_import_kernels_from_the_root_without_one_installed_is_an_absent_package():
    # transformers probes for Hugging Face's kernels with find_spec, then (no metadata) imports
    # it uncaught and counts a module with neither __file__ nor __version__ as absent; an
    # ImportError here broke `from transformers import Trainer` (transformers 5.24, no kernels)
    out = _run(
        "import importlib.util, kernels; "
        "print(importlib.util.find_spec('kernels') is not None, kernels.__file__, getattr(kernels, '__version__', 'N/A'))\n"
        "try:\n    import kernels.layers\nexcept ModuleNotFoundError as e:\n    print(type(e).__name__)\n"
        "kernels.get_kernel",
        None,
    )
    assert out.returncode == 1
    assert out.stdout.split() == ["True", "None", "N/A", "ModuleNotFoundError"]
    assert "AttributeError: module 'kernels' has no attribute 'get_kernel'" in out.stderr
    assert "imported as fasthist.kernels" in out.stderr
