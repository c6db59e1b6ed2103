"""Backend calls that ``torch.compile`` runs as one opaque operator per optimizer,
``fasthist::<name>_step``, generated from its :class:`~fasthist.declaration.OptimizerDecl`.

Two kinds of backend calls cannot be traced into a graph that compiles once: the Triton
kernels (their host code keeps launch tables and strategy caches keyed on data pointers,
which dynamo would guard on) and the torch update of an optimizer declared
``opaque_update`` (an update that branches in Python on the step count, such as a
rectified warm-up's ``N_sma >= 5``, or on ``lr == 0``). Under ``torch.compile`` :func:`functional_` hands the whole
per-device call to the optimizer's custom operator, whose implementation is the eager
call itself, so:

- the compiled step computes exactly what the eager step computes, bit for bit (it *is*
  the eager code, run by the operator);
- nothing in it is guarded on, so a new step count never recompiles (a float ``lr`` that
  a scheduler changes recompiles once, as ``torch.optim`` does, then is passed as a
  symbolic float; a Tensor ``lr`` never does);
- the call declares what it writes (the lists other than the gradients, both histogram
  windows), so the compiler orders it correctly against the traced ops, and it is one
  node of the graph: no graph break, and CUDA graphs (``mode="reduce-overhead"``)
  capture its launches like any other kernel's.

The operator's schema follows from the declaration (:func:`schema`): one typed argument
per list of the functional form (``Tensor(x!)[]`` where the call writes it), the
histogram target as its two windows, its rows and its bins (and, where the optimizer
declares staleness, ``decl.entering_grads``, the two staleness windows, None when not
tracked), and one argument per keyword
argument, under its own name: ``bool?`` for ``decl.bools``, ``Tensor?`` for
``decl.tensors``; a float of ``decl.floats`` has three typed slots, of which a call
fills at most one:

- ``<name>``, ``float?``: a Python float kept as a constant of the graph (Triton calls: a
  CPU tensor input would keep CUDA graphs from capturing the step; a new value
  recompiles, as the docs say: use a Tensor ``lr``);
- ``<name>_float``, ``Tensor?``: a Python float carried as a float64 CPU scalar (the other
  backends: a custom operator's float argument is specialised, guarded on, and a
  scheduler's every new ``lr`` would recompile; a tensor is an input), read back exactly
  with ``float()``;
- ``<name>_tensor``, ``Tensor?``: a Tensor given by the caller (``lr`` may be one, as in
  torch), passed as it is.

The operator hands the backend every keyword argument the declaration names, None for
one the call did not give (every declared flag of torch's functional forms means the same
when None as when left out). A new flag in a declaration therefore needs no edit here.

Why an opaque operator rather than ``torch.library.triton_op``/``wrap_triton``: those
trace the launcher's Python with dynamo, and this launcher's per-step Python (plan and
table caches on data pointers, the histogram strategy lookup) is exactly what must not be
guarded on; the kernels are already one fused launch per dtype, so inductor has nothing to
fuse them with. A Triton call is self-tested where the operator runs it, as the eager dispatcher does
(:func:`fasthist.selftest.check`, once per specialisation and process, not during a CUDA
graph capture): a specialisation that differed runs with ``tl.histogram``, or on torch's
functional form (the torch backend) in its place. The operator rebuilds its
:class:`~fasthist.target.HistTarget` from the
windows, rows and bins it is given, with an empty workspace: a backend's reusable buffers
(the Triton kernels' zeroed scratch, the torch-op pass's value buffers) are made again on
each compiled call.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import backend as backends
from . import selftest
from .bins import LogBins
from .declaration import OptimizerDecl
from .target import HistTarget

__all__ = ["functional_", "op", "schema"]


def _written(decl: OptimizerDecl) -> list[str]:
    """The lists a call writes: every one but the gradients."""
    return [name for name in decl.lists if name != "grads"]


# the staleness windows' arguments, after the histogram target's
_STALENESS = ("staleness_step", "staleness_total")
# a float's slots (module docstring): (schema type, suffix of its argument's name)
_FLOAT_SLOTS = (("float?", ""), ("Tensor?", "_float"), ("Tensor?", "_tensor"))


def _arguments(decl: OptimizerDecl) -> list[tuple[str, str]]:
    """``(type, name)`` of each argument of ``decl``'s operator after ``backend``, in
    order: its lists, the histogram target, then its bools, tensors and floats, each kind
    in name order (positional all: a custom operator takes no keyword-only tensors)."""
    aliases = iter(string.ascii_lowercase)
    lists = [("Tensor[]" if n == "grads" else f"Tensor({next(aliases)}!)[]", n) for n in decl.lists]
    hist = [(f"Tensor({next(aliases)}!)?", "hist_step"), (f"Tensor({next(aliases)}!)?", "hist_total")]
    if decl.entering_grads is not None:  # the staleness windows, where the optimizer has staleness
        hist += [(f"Tensor({next(aliases)}!)?", n) for n in _STALENESS]
    hist += [("Tensor?", "hist_rows"), ("int[]", "hist_bins")]
    options = [("bool?", n) for n in sorted(decl.bools)] + [("Tensor?", n) for n in sorted(decl.tensors)]
    options += [(t, n + suffix) for n in sorted(decl.floats) for t, suffix in _FLOAT_SLOTS]
    return lists + hist + options


def schema(decl: OptimizerDecl) -> str:
    """The schema of ``decl``'s operator (module docstring, :func:`_arguments`)."""
    return f"(str backend, {', '.join(f'{t} {n}' for t, n in _arguments(decl))}) -> ()"


def _float_slots(name: str, value: Any, constant: bool) -> dict[str, Any]:
    """The filled slot of the float ``name`` (module docstring); none for None."""
    if value is None:
        return {}
    if isinstance(value, Tensor):
        return {f"{name}_tensor": value}
    if constant:
        return {name: float(value)}
    return {f"{name}_float": torch.tensor(value, dtype=torch.float64)}


def _float_value(args: dict[str, Any], name: str) -> Any:
    """The float ``name`` as the caller gave it, read back from its slots."""
    carried = args[f"{name}_float"]
    if carried is not None:
        return float(carried)
    tensor = args[f"{name}_tensor"]
    return tensor if tensor is not None else args[name]


def _implementation(decl: OptimizerDecl) -> Callable[..., None]:
    """The operator's body: rebuild the call (lists, target, keyword arguments) and run it eagerly."""
    names = [n for _, n in _arguments(decl)]

    def run(backend: str, *values: Any) -> None:
        args = dict(zip(names, values, strict=True))
        hist = None
        if args["hist_step"] is not None:
            bins = LogBins(*args["hist_bins"])
            stale = args.get("staleness_step")
            staleness = (stale, args["staleness_total"]) if stale is not None else None
            hist = HistTarget(bins, args["hist_step"], args["hist_total"], args["hist_rows"], staleness=staleness)
        kwargs = {n: args[n] for n in (*decl.bools, *decl.tensors)}
        kwargs.update((n, _float_value(args, n)) for n in decl.floats)
        lists = [args[n] for n in decl.lists]
        note = None
        if backend == backends.TRITON:
            # the eager dispatcher's self-test (fasthist.selftest), here where the call runs:
            # the traced step cannot choose another backend, the operator still can
            note = selftest.check(decl, lists[0][0].device, lists, hist, kwargs)
            if note is not None and note != selftest.TL_NOTE:
                backend = backends.TORCH  # turned down; the self-test's warning said so
        with selftest.histogram(note):
            backends.run(backend, decl, lists, hist, kwargs)

    run.__name__ = f"{decl.name}_step"
    return run


_OPS: dict[str, tuple[Any, tuple[str, ...]]] = {}


def op(decl: OptimizerDecl) -> Any:
    """``decl``'s operator, ``torch.ops.fasthist.<name>_step``, defined on first use (call it
    before tracing: an optimizer does at construction)."""
    return _op_and_names(decl)[0]


def _op_and_names(decl: OptimizerDecl) -> tuple[Any, tuple[str, ...]]:
    found = _OPS.get(decl.name)
    if found is not None:
        return found
    if not decl.name.isidentifier():
        raise ValueError(f"Invalid optimizer name for a custom operator: {decl.name!r}")
    mutated = (*_written(decl), "hist_step", "hist_total", *(_STALENESS if decl.entering_grads is not None else ()))
    defined = torch.library.custom_op(f"fasthist::{decl.name}_step", mutates_args=mutated, schema=schema(decl))(
        _implementation(decl)
    )
    defined.register_fake(lambda *args: None)  # writes in place, returns nothing
    found = _OPS[decl.name] = (defined, tuple(n for _, n in _arguments(decl)))
    return found


def functional_(
    decl: OptimizerDecl, backend: str, lists: list[list[Tensor]], hist: HistTarget | None, kwargs: dict
) -> None:
    """Run one per-device call of ``decl`` on ``backend`` (:func:`fasthist.backend.run`) as
    its operator ``fasthist::<name>_step``: ``lists`` are the functional form's positional
    lists, ``hist`` its target or None, ``kwargs`` its keyword arguments, each one a name
    the declaration gives (a TypeError otherwise: the operator would drop it)."""
    defined, names = _op_and_names(decl)
    for k in kwargs:
        if k not in decl.bools and k not in decl.floats and k not in decl.tensors:
            raise TypeError(f"fasthist {decl.name}: keyword argument {k!r} is not declared by the optimizer")
    args: dict[str, Any] = dict(zip(decl.lists, lists, strict=True))
    bins = hist.bins if hist is not None else LogBins()
    args.update(hist_step=None, hist_total=None, hist_rows=None, hist_bins=list(bins.spec))
    if hist is not None:
        args.update(hist_step=hist.step, hist_total=hist.total, hist_rows=hist.rows)
        if hist.staleness is not None:
            args.update(zip(_STALENESS, hist.staleness, strict=True))
    constant = backend == backends.TRITON
    for k, v in kwargs.items():
        args.update(_float_slots(k, v, constant) if k in decl.floats else {k: v})
    defined(backend, *(args.get(n) for n in names))
