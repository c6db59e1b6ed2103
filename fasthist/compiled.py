"""Backend calls that ``torch.compile`` runs as one opaque operator, ``fasthist::functional_``.

Two kinds of backend calls cannot be traced into a graph that compiles once: the Triton
kernels (their host code keeps launch tables, workspaces and strategy caches keyed on data
pointers, which dynamo would guard on) and the torch update of an optimizer declared
``opaque_update`` (AdaBelief's branches on the step count in Python: RAdam's
``N_sma >= 5``, ``lr == 0``). Under ``torch.compile``
:func:`functional_` hands the whole per-device call to a custom operator whose
implementation is the eager call itself, so:

- the compiled step computes exactly what the eager step computes, bit for bit (it *is*
  the eager code, run by the operator);
- nothing in it is guarded on, so a new step count never recompiles (a float ``lr`` that
  a scheduler changes recompiles once, as ``torch.optim`` does, then is passed as a
  symbolic float; a Tensor ``lr`` never does);
- the call declares what it writes (parameters, states, step counts, both histogram
  windows), so the compiler orders it correctly against the traced ops, and it is one
  node of the graph: no graph break, and CUDA graphs (``mode="reduce-overhead"``)
  capture its launches like any other kernel's.

Why an opaque operator rather than ``torch.library.triton_op``/``wrap_triton``: those
trace the launcher's Python with dynamo, and this launcher's per-step Python (plan and
table caches on data pointers, the histogram strategy lookup) is exactly what must not be guarded on; the kernels are already
one fused launch per dtype, so inductor has nothing to fuse them with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import backend as backends
from .declaration import lookup
from .target import HistTarget

__all__ = ["functional_"]


# The keyword arguments travel in typed groups of (names, values): tensors; floats carried as
# float64 CPU scalar tensors ("scalars": a custom op's float argument is always specialized,
# guarded on, a tensor is not); floats kept as graph constants; bools; ints; Nones.
_GROUPS = ("tensor", "scalar", "float", "bool", "int", "none")
_SCHEMA = (
    "(str op, str backend, Tensor(a!)[] written, Tensor[] grads, int[] sizes, Tensor(b!)[] windows, "
    "Tensor? rows, int target_key, str[] tensor_names, Tensor[] tensors, str[] scalar_names, Tensor[] scalars, "
    "str[] float_names, float[] floats, str[] bool_names, bool[] bools, str[] int_names, int[] ints, "
    "str[] none_names) -> ()"
)


@torch.library.custom_op("fasthist::functional_", mutates_args=("written", "windows"), schema=_SCHEMA)
def _functional_op(
    op: str,
    backend: str,
    written: list[Tensor],
    grads: list[Tensor],
    sizes: list[int],
    windows: list[Tensor],
    rows: Tensor | None,
    target_key: int,
    tensor_names: list[str],
    tensors: list[Tensor],
    scalar_names: list[str],
    scalars: list[Tensor],
    float_names: list[str],
    floats: list[float],
    bool_names: list[str],
    bools: list[bool],
    int_names: list[str],
    ints: list[int],
    none_names: list[str],
) -> None:
    """Rebuild the call (lists, ``hist``, keyword arguments) and run it eagerly."""
    it = iter(written)
    lists = [grads if i == 1 else [next(it) for _ in range(n)] for i, n in enumerate(sizes)]
    hist = None
    if windows:
        live = HistTarget.live(target_key)
        assert rows is not None and live is not None, "fasthist::functional_: its HistTarget is gone"
        hist = live.over(windows[0], windows[1], rows)
    kwargs: dict[str, Any] = dict(zip(tensor_names, tensors, strict=True))
    kwargs.update((k, float(t)) for k, t in zip(scalar_names, scalars, strict=True))
    for names, values in ((float_names, floats), (bool_names, bools), (int_names, ints)):
        kwargs.update(zip(names, values, strict=True))
    kwargs.update(dict.fromkeys(none_names))
    backends.run(backend, lookup(op), lists, hist, kwargs)


@_functional_op.register_fake
def _(op, backend, written, grads, sizes, windows, rows, target_key, *args) -> None:
    return None


def _group(value: Any, triton: bool) -> tuple[str, Any]:
    """The typed group of a keyword argument's value, and the value as that group carries it."""
    if isinstance(value, Tensor):
        return "tensor", value
    if value is None:
        return "none", None
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, int):
        return "int", value
    if triton:  # a constant of the graph: a new value recompiles (use a Tensor lr)
        return "float", float(value)
    # a float64 CPU scalar: a float that changes (lr) becomes an input after one recompile
    return "scalar", torch.tensor(value, dtype=torch.float64)


def functional_(op: str, backend: str, lists: list[list[Tensor]], hist: HistTarget | None, kwargs: dict) -> None:
    """Run the per-device call of the optimizer declared as ``op`` on ``backend``
    (:func:`fasthist.backend.run`) as the opaque operator ``fasthist::functional_``:
    ``lists`` are the functional form's positional lists (grads second), ``hist`` its
    target or None."""
    triton = backend == backends.TRITON
    written = [t for i, lst in enumerate(lists) if i != 1 for t in lst]
    windows = [hist.step, hist.total] if hist is not None else []
    groups: dict[str, tuple[list[str], list[Any]]] = {k: ([], []) for k in _GROUPS}
    for k, v in kwargs.items():
        kind, carried = _group(v, triton)
        groups[kind][0].append(k)
        groups[kind][1].append(carried)
    typed: list[Any] = []
    for kind in _GROUPS[:-1]:
        typed.extend(groups[kind])
    _functional_op(
        op,
        backend,
        written,
        lists[1],
        [len(lst) for lst in lists],
        windows,
        hist.rows if hist is not None else None,
        hist.key if hist is not None else -1,
        *typed,
        groups["none"][0],
    )
