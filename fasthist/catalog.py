"""Every built-in optimizer's declaration (:class:`fasthist.declaration.OptimizerDecl`).

An optimizer is a class module ``fasthist/<name>.py`` that declares it, beside its reference
``fasthist/reference/<name>.py`` (and its kernel ``kernels/<name>.py``): so the built-ins are
found by that pairing, and adding one needs no list here or anywhere else.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

from . import reference
from .declaration import OptimizerDecl, registered

__all__ = ["declarations"]


def declarations() -> dict[str, OptimizerDecl]:
    """The declarations of every built-in optimizer (and of any registered since), by name,
    in the order their names sort."""
    for info in pkgutil.iter_modules(reference.__path__):
        module = f"{__package__}.{info.name}"
        if not info.name.startswith("_") and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    found = registered()
    return {name: found[name] for name in sorted(found)}
