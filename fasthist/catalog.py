"""Every built-in optimizer's declaration (:class:`fasthist.declaration.OptimizerDecl`).

An optimizer is a class module ``fasthist/<name>.py`` that declares it, beside its reference
``fasthist/reference/<name>.py`` (and its kernel ``kernels/<name>.py``): so the built-ins are
found by that pairing, and adding one needs no list here or anywhere else. Modules that
need one particular optimizer (the tasks, the command line's benchmarks, the ε-range rule's
default) ask for :func:`default` and :func:`optimizer_class` instead of naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import TYPE_CHECKING

from . import reference
from .declaration import OptimizerDecl, registered

if TYPE_CHECKING:
    import torch

__all__ = ["declarations", "default", "optimizer_class"]


def declarations() -> dict[str, OptimizerDecl]:
    """The declarations of every built-in optimizer (and of any registered since), by name,
    in the order their names sort."""
    for info in pkgutil.iter_modules(reference.__path__):
        module = f"{__package__}.{info.name}"
        if not info.name.startswith("_") and importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    found = registered()
    return {name: found[name] for name in sorted(found)}


def default() -> OptimizerDecl:
    """The declaration of the optimizer used where none is named (``OptimizerDecl.default``)."""
    found = [decl for decl in declarations().values() if decl.default]
    if len(found) != 1:
        raise RuntimeError(f"expected one default optimizer declaration, found {[d.name for d in found]}")
    return found[0]


def optimizer_class(decl: OptimizerDecl) -> type[torch.optim.Optimizer]:
    """The optimizer class of a built-in ``decl``: the first class its module
    (``fasthist/<name>.py``) exports, in ``__all__`` order, that declares it, so the one
    without preset options where a subclass presets some (decoupled weight decay, say)."""
    module = importlib.import_module(f"{__package__}.{decl.name}")
    for name in module.__all__:
        if getattr(getattr(module, name), "declaration", None) is decl:
            return getattr(module, name)
    raise KeyError(f"no fasthist class declares {decl.name!r}")
