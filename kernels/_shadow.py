"""What ``import kernels`` finds when a fasthist checkout's root is on ``sys.path``.

fasthist installs this folder as ``fasthist.kernels``; the top-level name ``kernels`` is
another distribution's (Hugging Face's ``kernels``, a dependency of transformers >= 5.25).
Run from the checkout's root, Python finds the folder first and every ``import kernels``
(transformers' included) would get fasthist's kernels. :func:`step_aside` loads the module
that the rest of ``sys.path`` holds under that name instead, so both work side by side, or,
with none installed, an empty stand-in that import probes count as not installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType


def _same_folder(entry: str, root: str) -> bool:
    try:
        return os.path.samefile(entry or os.curdir, root)
    except OSError:  # a missing folder or a zip file: not the checkout
        return False


def step_aside(init_file: str) -> ModuleType:
    """The top-level ``kernels`` module found on ``sys.path`` past the checkout holding
    ``init_file`` (``kernels/__init__.py``), executed and returned.

    With none installed, an empty stand-in (:func:`_absent`) is returned instead of raising:
    libraries probe for an optional ``kernels`` by importing it (transformers' ``Trainer``
    does, uncaught), and must find it absent, not fail."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [entry for entry in sys.path if not _same_folder(entry, root)]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return _absent(root)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the package's own imports of kernels.* must find it
    spec.loader.exec_module(module)
    return module


def _absent(root: str) -> ModuleType:
    """A ``kernels`` that holds nothing, shaped like a namespace package with no folders: no
    ``__file__``, no ``__version__``, an empty ``__path__`` (so ``import kernels.x`` raises
    ModuleNotFoundError), the marks by which an import probe (transformers'
    ``_is_package_available``) counts a package as not installed. Any other attribute raises
    AttributeError saying what the checkout's folder is."""
    module = ModuleType("kernels")
    module.__file__ = None
    module.__path__ = []
    module.__spec__ = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
    module.__spec__.submodule_search_locations = []

    def __getattr__(name: str):
        raise AttributeError(
            f"module 'kernels' has no attribute {name!r}: no package named 'kernels' is installed outside {root}, "
            "whose kernels/ folder is fasthist's Triton kernels, imported as fasthist.kernels"
        )

    module.__getattr__ = __getattr__
    return module
