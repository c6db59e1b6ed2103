"""Each fasthist optimizer declared once: what the dispatcher, the compiled op, the ε-range
estimate, the benchmarks and the SASS report need to know about it, in one frozen record
(:class:`OptimizerDecl`) that lives beside the optimizer's class.

The histogrammed value of tensor ``i``, from the functional form's lists after the update::

    values, scale, found_inf = decl.hist_inputs(lists, kwargs)
    x_i = sqrt(values[i]) / scale[i]        (decl.sqrt, not decl.reciprocal)
    x_i = values[i] * scale[i]              (not decl.sqrt, decl.reciprocal)

which every backend bins (:mod:`fasthist.reference.histogram` states the rounding).

A second quantity, the staleness of the second moment (:mod:`fasthist.health`), is tracked
where the declaration says how the gradient enters the second moment
(``decl.entering_grads``, read *before* the update)::

    s_i = |g_i| / max(x_i, eps)           (float32 IEEE division; float64 for float64 tensors)

with ``x_i`` the histogrammed value above and ``eps`` the group's ε (:mod:`fasthist.reference.staleness`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "QUANTITIES",
    "EpsRangeDecl",
    "FusedCpuDecl",
    "OptimizerDecl",
    "quantities",
    "register",
    "lookup",
    "registered",
]

QUANTITIES = ("sqrt_v", "staleness")
"""The quantities an optimizer can histogram, by the names ``track=`` takes: ``"sqrt_v"``, the
value ε is added to (module docstring), and ``"staleness"``, ``|g| / max(√v̂, ε)``."""


def quantities(track: bool | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The quantities a (checked) ``track`` value records: ``True`` is ``("sqrt_v",)``,
    ``False`` none, names as given."""
    if isinstance(track, bool):
        return ("sqrt_v",) if track else ()
    return tuple(track)


HistInputs = tuple[list[Tensor], "list[float] | Tensor", "Tensor | None"]
"""``(values, scale, found_inf)``: what the histogram pass of one call bins (module docstring)."""


@dataclass(frozen=True)
class EpsRangeDecl:
    """One way to run the ε-range rule (:func:`fasthist.estimate_eps_range`) with this
    optimizer: ``factory(params, betas=..., weight_decay=..., bins=...)`` builds an optimizer
    whose step updates the moments and leaves the weights bit for bit unchanged; ``quantity``
    names what its histograms hold."""

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    quantity: str


@dataclass(frozen=True)
class FusedCpuDecl:
    """The fused tracked CPU op of an optimizer (:func:`fasthist.csrc.fused_step_`, run for
    ``fused=True`` on CPU tensors): ``op``, its name under ``torch.ops.fasthist``;
    ``options``, the declared flags and floats other than ``lr`` it takes, by the same names;
    ``x86_tail``, the modulus of the tail where torch's fused CPU kernel, as its x86 wheels
    compile it (AVX512 and AVX2), rounds the other way (the op reproduces it on the last
    ``numel % x86_tail`` elements; 0 for none)."""

    op: str
    options: tuple[str, ...]
    x86_tail: int = 0


@dataclass(frozen=True)
class OptimizerDecl:
    """One optimizer, declared once.

    - ``name``: its key (the registry's, the compiled op's, the benchmarks').
    - ``lists``: the positional list arguments of its functional form, in order: the
      parameters first, the gradients second, the step counts last.
    - ``value``: what its histograms hold, in words (messages, reports).
    - ``update``: the pure torch update, the functional form's lists and keyword arguments
      without ``hist`` (torch's own functional where there is one).
    - ``hist_inputs``: ``(lists, kwargs) -> (values, scale, found_inf)`` after ``update``;
      ``sqrt`` and ``reciprocal`` say how they combine (module docstring).
    - ``bools``, ``floats``, ``tensors``: its keyword arguments of those types (``floats``
      may also be given as one-element tensors, as ``lr`` may in torch; ``tensors`` may be
      None, e.g. ``torch.amp.GradScaler``'s ``grad_scale`` and ``found_inf``).
    - ``kernel``: ``(module under fasthist.kernels, function)`` of its Triton backend, None
      for none; ``kernel_dtypes``: the parameter dtypes that kernel steps.
    - ``fused_cpu``: its fused tracked CPU op (:class:`FusedCpuDecl`), run for
      ``fused=True``; None for none.
    - ``opaque_update``: its update branches in Python on values a compiled graph must not
      guard on (the step count), so under ``torch.compile`` its torch backend too runs as one
      opaque operator (:mod:`fasthist.compiled`).
    - ``eps_ranges``: the ε-range rule's ways to run it (:class:`EpsRangeDecl`).
    - ``default_states``: the state lists its update reads and writes under its default
      options (bytes moved per step, for the benchmarks).
    - ``entering_grads``: ``(lists, kwargs) -> list[Tensor]``, the gradient of each tensor
      as it enters the second moment (unscaled, negated under ``maximize``, with coupled
      weight decay, in the precision the update computes it), read *before* the update; it
      makes ``"staleness"`` trackable. None: the optimizer has no staleness, and
      ``no_staleness`` says why (the message of the ``ValueError`` refusing it).
    - ``state_dtype``: ``parameter dtype -> dtype`` of its state tensors (the lists between
      the gradients and the step counts), where they are not the parameter's own (None),
      checked before a step writes anything (:func:`fasthist.backend.check_states`).
    - ``default``: it is the optimizer fasthist uses where none is named (the paper's: the
      ε-range rule's default, the tasks', the command line's benchmarks); one built-in
      declaration sets it (:func:`fasthist.catalog.default`).
    """

    name: str
    lists: tuple[str, ...]
    value: str
    update: Callable[..., None]
    hist_inputs: Callable[[list[list[Tensor]], dict[str, Any]], HistInputs]
    bools: frozenset[str]
    floats: frozenset[str]
    tensors: frozenset[str] = frozenset()
    sqrt: bool = True
    reciprocal: bool = False
    kernel: tuple[str, str] | None = None
    kernel_dtypes: tuple[torch.dtype, ...] = ()
    fused_cpu: FusedCpuDecl | None = None
    opaque_update: bool = False
    eps_ranges: tuple[EpsRangeDecl, ...] = ()
    default_states: tuple[str, ...] = ()
    entering_grads: Callable[[list[list[Tensor]], dict[str, Any]], list[Tensor]] | None = None
    no_staleness: str = ""
    state_dtype: Callable[[torch.dtype], torch.dtype] | None = None
    default: bool = False

    @property
    def trackable(self) -> tuple[str, ...]:
        """The quantities (:data:`QUANTITIES`) this optimizer can histogram."""
        return QUANTITIES if self.entering_grads is not None else ("sqrt_v",)

    def __post_init__(self) -> None:
        if self.lists[:2] != ("params", "grads") or self.lists[-1] != "state_steps":
            raise ValueError(f"Invalid lists: {self.lists}; expected params, grads, ..., state_steps")
        if not set(self.default_states) <= set(self.lists[2:-1]):
            raise ValueError(f"Invalid default_states: {self.default_states}; expected names from {self.lists[2:-1]}")
        kinds = (set(self.lists), self.bools, self.floats, self.tensors)
        if sum(map(len, kinds)) != len(set().union(*kinds)):
            raise ValueError(f"Invalid keyword arguments of {self.name}: a name is declared twice")
        if self.fused_cpu is not None and not set(self.fused_cpu.options) <= (self.bools | self.floats) - {"lr"}:
            raise ValueError(f"Invalid fused_cpu options: {self.fused_cpu.options}; expected declared flags or floats")


_REGISTRY: dict[str, OptimizerDecl] = {}


def register(decl: OptimizerDecl) -> OptimizerDecl:
    """Add ``decl`` under its name (an optimizer's module does this when it is imported)."""
    known = _REGISTRY.get(decl.name)
    if known is not None and known is not decl:
        raise ValueError(f"optimizer {decl.name!r} is already declared")
    _REGISTRY[decl.name] = decl
    return decl


def lookup(name: str) -> OptimizerDecl:
    """The declaration registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no fasthist optimizer declared as {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def registered() -> dict[str, OptimizerDecl]:
    """Every declaration registered so far, by name (see :func:`fasthist.catalog.declarations`
    for every built-in one)."""
    return dict(_REGISTRY)
