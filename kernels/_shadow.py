"""What ``import kernels`` finds when a fasthist checkout's root is on ``sys.path``.

fasthist installs this folder as ``fasthist.kernels``; the top-level name ``kernels`` is
another distribution's (Hugging Face's ``kernels``, a dependency of transformers >= 5.25).
Run from the checkout's root, Python finds the folder first and every ``import kernels``
(transformers' included) would get fasthist's kernels. :func:`step_aside` loads the module
that the rest of ``sys.path`` holds under that name instead, so both work side by side.
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
    ``init_file`` (``kernels/__init__.py``), executed and returned; ImportError if there is
    none, saying that this folder is imported as ``fasthist.kernels``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [entry for entry in sys.path if not _same_folder(entry, root)]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        raise ImportError(
            f"No module named 'kernels' outside {root}: that checkout's kernels/ folder is fasthist's Triton "
            "kernels, imported as fasthist.kernels",
            name="kernels",
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the package's own imports of kernels.* must find it
    spec.loader.exec_module(module)
    return module
