r"""The ε-range rule of Silva & Rodriguez (arXiv 2311.11532) on a model and its data.

One pass over ``batches`` at the model's current weights, which are never changed:
for every batch the gradient of ``loss_fn(model, batch)`` is computed, clipped
(``clip_grad_norm``) and, for optimizers with coupled weight decay, has
``weight_decay * θ`` added, exactly as the user's training would; the optimizer's
moment estimates are updated, the weights are not. At the last step, per parameter
tensor, the quantity ε competes with (the declared value: ``sqrt(v_hat)`` by default) is histogrammed
by the fasthist optimizer itself, exact zeros are dropped, and the rule of
:mod:`fasthist.eps` gives the range: per-tensor ``a[floor(low*n)]`` and
``a[floor(high*n)]``, the envelope over tensors, decade rounding.

No value is sorted: the percentiles come from the histograms, each within the bins'
relative accuracy (1.54% by default), so the rounded bounds agree with a sort-based
implementation of the rule except when a raw bound lies within that accuracy of a
rounding boundary ``10**(k+0.5)``; the result's ``ambiguous`` flag says when.

How the weights stay untouched: the moments are updated by a fasthist optimizer built
with ``lr=0`` (and ``eps=1``, which never enters the moments or the histogrammed
quantity but keeps ``m / (sqrt(v_hat) + eps)`` finite), so every update adds
``-0.0 * finite`` (a signed zero) to each weight, which leaves its bits as they were,
except that ``-0.0 + +0.0`` is ``+0.0``: weights that are negative zeros are found before
the pass and set back to ``-0.0`` after every step. Arguments are checked before the first
batch (finite numbers only), gradients at each step. Parameters and buffers (BatchNorm
running statistics, ...) are restored by name after the pass, whatever ended it, and each
parameter's ``.grad`` is put back as it was.

Every gradient must be finite, except those of the tensors ``exclude=`` names (checked
against the model's names first, and applied before this check, as
:func:`fasthist.eps.eps_range_from_counts` does): those are stepped and histogrammed as they
are (NaN/inf show in their counts, which the rule then leaves out), and their weights are put
back after each step whose update was not finite. ``clip_grad_norm`` takes every tensor's
gradient into its norm, as in training, so there one non-finite gradient spreads to all.

Other optimizers plug in through :func:`register_eps_optimizer`: a factory that builds a
fasthist optimizer with the same moment update and a zero step. Each histograms what its ε
is added to, in ε's units (the ``quantity`` of its registration below; the optimizer's
docstring has the details), as the paper's rule carries over from its optimizer: Silva & Rodriguez,
"Fine-Tuning Adaptive Stochastic Optimizers: Determining the Optimal Hyperparameter ε via
Gradient Magnitude Histogram Analysis" (arXiv 2311.11532, 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .bins import LogBins
from .catalog import declarations, default
from .declaration import EpsRangeDecl
from .eps import EpsRange, Exclude, eps_range_from_counts, excluded_names
from .progress import progress_bar

__all__ = [
    "DEFAULT_OPTIMIZER",
    "EpsOptimizer",
    "ModelSnapshot",
    "estimate_eps_range",
    "eps_pass",
    "eps_optimizers",
    "register_eps_optimizer",
]


#: How the rule runs for one optimizer: the record each optimizer declares
#: (:class:`fasthist.declaration.EpsRangeDecl`: ``name``, ``factory``, ``quantity``), which
#: :func:`register_eps_optimizer` builds for any other.
EpsOptimizer = EpsRangeDecl


_REGISTRY: dict[str, EpsOptimizer] = {}

#: The optimizer of the paper, and of ``optimizer=``'s default: the first way the default
#: optimizer's declaration runs the rule (:func:`fasthist.catalog.default`).
DEFAULT_OPTIMIZER = default().eps_ranges[0].name


def register_eps_optimizer(
    name: str, factory: Callable[..., torch.optim.Optimizer], *, quantity: str, replace: bool = False
) -> None:
    """Make ``optimizer=name`` available to :func:`estimate_eps_range` (see :class:`EpsOptimizer`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid optimizer name: {name!r}; expected a non-empty str")
    if name in _REGISTRY and not replace:
        raise ValueError(f"optimizer {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = EpsRangeDecl(name, factory, quantity)


def eps_optimizers() -> list[str]:
    """Names accepted by ``optimizer=``."""
    return sorted(_REGISTRY)


def _register_builtins() -> None:
    """The ways each built-in optimizer declares to run the rule (``OptimizerDecl.eps_ranges``)."""
    for decl in declarations().values():
        for way in decl.eps_ranges:
            register_eps_optimizer(way.name, way.factory, quantity=way.quantity)


_register_builtins()


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings and non-finite numbers are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _check_args(
    optimizer: str,
    betas: tuple[float, float],
    weight_decay: float,
    clip_grad_norm: float | None,
    steps: int | None,
    percentiles: tuple[float, float] = (0.02, 0.98),
    model: nn.Module | None = None,
    exclude: Exclude = None,
) -> EpsOptimizer:
    """Every argument, before any batch is drawn: a bad one must not cost a pass (or leave
    NaN in the weights, as ``weight_decay=inf`` did through ``0 * inf``); with ``model``,
    ``exclude`` against the names of its parameters that require grad."""
    spec = _REGISTRY.get(optimizer) if isinstance(optimizer, str) else None
    if spec is None:
        raise ValueError(f"Invalid optimizer: {optimizer!r}; expected one of {', '.join(eps_optimizers())}")
    try:
        b = [_finite(x) for x in betas]
    except TypeError:
        b = []
    if len(b) != 2 or not all(x is not None and 0.0 <= x < 1.0 for x in b):
        raise ValueError(f"Invalid betas: {betas}; expected two finite values in [0, 1)")
    wd = _finite(weight_decay)
    if wd is None or wd < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r}; expected a finite number >= 0")
    if clip_grad_norm is not None and not (_finite(clip_grad_norm) or 0.0) > 0.0:
        raise ValueError(f"Invalid clip_grad_norm: {clip_grad_norm!r}; expected a positive finite number or None")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"Invalid steps: {steps!r}; expected a positive int or None")
    lo, hi = (_finite(q) for q in percentiles)
    if lo is None or hi is None or not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(
            f"Invalid percentiles: low={percentiles[0]!r}, high={percentiles[1]!r}; need 0 <= low <= high <= 1"
        )
    if model is not None:
        excluded_names([n for n, p in model.named_parameters() if p.requires_grad], exclude)
    return spec


class ModelSnapshot:
    """Every parameter and buffer of a module, by name: the tensor object and a copy of its
    values (on the CPU, so a model that fills its GPU can still be snapshotted).

    :meth:`restore` puts back, under each name, the very tensor the name held (a module that
    reassigns ``self.buf = self.buf + x`` in ``forward`` gets its original buffer back, not
    the new one with old values) and its saved values; it returns the names of parameters
    whose object or bits had changed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.entries: list[tuple[bool, str, nn.Module, str, Tensor]] = []
        self.copies: dict[int, Tensor] = {}  # by id: tied tensors are copied once
        named = [(True, n, t) for n, t in model.named_parameters(remove_duplicate=False)]
        named += [(False, n, t) for n, t in model.named_buffers(remove_duplicate=False)]
        for is_param, name, t in named:
            owner_name, _, attr = name.rpartition(".")
            self.entries.append((is_param, name, model.get_submodule(owner_name), attr, t))
            if id(t) not in self.copies:
                self.copies[id(t)] = t.detach().to("cpu", copy=True)

    def restore(self) -> list[str]:
        changed = []
        with torch.no_grad():
            for is_param, name, owner, attr, t in self.entries:
                saved = self.copies[id(t)]
                replaced = getattr(owner, attr, None) is not t
                if replaced:
                    setattr(owner, attr, t)
                if is_param and (replaced or not _same_bits(t.detach(), saved)):
                    changed.append(name)
                t.detach().copy_(saved)
        return changed


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (NaN equals itself, -0.0 differs from +0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.reshape(-1).contiguous(), b.to(a.device).reshape(-1).contiguous()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype != torch.bool else torch.equal(a, b)


def _length(batches: Iterable[Any], steps: int | None) -> int | None:
    """The number of batches the pass will take, or None when unknown: a DataLoader over an
    IterableDataset has ``__len__`` but raises TypeError from it."""
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return steps
    return n if steps is None else min(steps, n)


def eps_pass(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    optimizer: str = DEFAULT_OPTIMIZER,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = None,
    steps: int | None = None,
    progress: bool = True,
    bins: LogBins | None = None,
    exclude: Exclude = None,
) -> torch.optim.Optimizer:
    """The pass of :func:`estimate_eps_range`, returning the fasthist optimizer whose
    moments and histograms it filled: query it with ``eps_range()``, ``histograms()``,
    ``quantiles()``, or plot it with :mod:`fasthist.plot`.

    Gradients must be finite, but for the tensors ``exclude`` names (module docstring).
    Whatever happens (an error in ``loss_fn``, a non-finite gradient, Ctrl-C), the model's
    parameters and buffers are put back by name, objects and bits, as they were. If a
    parameter changed during a pass that otherwise succeeded (a weight decay that
    overflows, a module that edits its weights), the gradients were not all taken at the
    initial weights: RuntimeError."""
    spec = _check_args(optimizer, betas, weight_decay, clip_grad_norm, steps)
    checked = _Checked(model, exclude, clip_grad_norm)  # checks exclude against the names
    betas = tuple(float(b) for b in betas)
    opt = spec.factory(checked.named, betas=betas, weight_decay=float(weight_decay), bins=bins)
    saved_grads = [p.grad for p in checked.params]
    snapshot = ModelSnapshot(model)
    bar = progress_bar(_length(batches, steps), f"eps-range ({optimizer})", enabled=progress, unit="batch")
    done = 0
    failed = True
    try:
        for batch in batches:
            _pass_step(model, batch, loss_fn, opt, checked, done)
            done += 1
            if bar is not None:
                bar.update(1)
            if steps is not None and done >= steps:
                break  # before fetching another batch
        failed = False
    finally:
        if bar is not None:
            bar.close()
        for p, g in zip(checked.params, saved_grads, strict=True):
            p.grad = g
        changed = snapshot.restore()
    if changed and not failed:
        raise RuntimeError(
            f"eps-range: parameter(s) {', '.join(changed[:5])} changed during the pass (an overflowing "
            "weight_decay, or a module that modifies its parameters), so the gradients were not all taken at "
            "the initial weights; the model has been restored"
        )
    if done == 0:
        raise ValueError("batches yielded no batch")
    return opt


def _negative_zeros(params: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``(values, mask)`` for the rare parameters that hold a -0.0 (real view of a complex
    one): the pass's ``lr=0`` step adds ``-0.0``, which turns ``-0.0`` into ``+0.0``, so
    these are set back after every step."""
    negative_zeros = []
    with torch.no_grad():
        for p in params:
            r = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
            mask = (r == 0) & torch.signbit(r)
            if bool(mask.any()):
                negative_zeros.append((r, mask))
    return negative_zeros


class _Checked:
    """The pass's parameters (those of ``model`` that require grad), split by ``exclude=``:
    the gradients of those kept must be finite; those left out may not be, and a left-out
    tensor whose gradient is not finite gets its weights back after the step (its update
    is NaN). The negative zeros are put back after every step too."""

    def __init__(self, model: nn.Module, exclude: Exclude, clip_grad_norm: float | None) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("model has no parameter that requires grad")
        self.excluded = excluded_names([n for n, _ in self.named], exclude)
        self.params = [p for _, p in self.named]
        self.clip_grad_norm = clip_grad_norm
        self.negative_zeros = _negative_zeros(self.params)

    def clip_and_check(self, done: int) -> list[tuple[Tensor, Tensor]]:
        """Clips (when asked), checks that every kept gradient is finite, and returns
        ``(weights, copy)`` of the left-out tensors whose gradient is not. One host read."""
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params, float(self.clip_grad_norm))
        stepped = [(n, p, x) for (n, p), x in zip(self.named, self.excluded, strict=True) if p.grad is not None]
        if not stepped:
            return []
        finite = torch.stack([torch.isfinite(p.grad.detach()).all() for _, p, _ in stepped]).tolist()
        bad = [n for (n, _, x), ok in zip(stepped, finite, strict=True) if not ok and not x]
        if bad:
            spread = (
                " (clip_grad_norm's total norm takes every tensor: one non-finite gradient makes all non-finite)"
                if self.clip_grad_norm is not None
                else ""
            )
            raise RuntimeError(
                f"non-finite gradient at batch {done} in {', '.join(bad[:5])}; exclude= leaves such a tensor "
                f"out{spread}; the ε-range rule needs finite gradients"
            )
        return [(p.detach(), p.detach().clone()) for (_, p, x), ok in zip(stepped, finite, strict=True) if x and not ok]


def _pass_step(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    opt: torch.optim.Optimizer,
    checked: _Checked,
    done: int,
) -> None:
    """One batch of the pass: the gradient of ``loss_fn(model, batch)`` at the unchanged
    weights, clipped and checked, then the optimizer's zero step (moments and histograms
    only), and the weights it could not leave alone put back (left-out tensors with a
    non-finite gradient; negative zeros)."""
    for p in checked.params:
        p.grad = None
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a one-element Tensor, but got {type(loss).__name__}")
    loss.backward()
    saved = checked.clip_and_check(done)
    opt.step()
    with torch.no_grad():
        for weights, copy in saved:
            weights.copy_(copy)
        for r, mask in checked.negative_zeros:
            r.masked_fill_(mask, -0.0)


def estimate_eps_range(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    optimizer: str = DEFAULT_OPTIMIZER,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = None,
    steps: int | None = None,
    low: float = 0.02,
    high: float = 0.98,
    progress: bool = True,
    bins: LogBins | None = None,
    exclude: Exclude = None,
    drop_dead: bool = False,
) -> EpsRange:
    r"""The paper's ε search range for ``model`` at its current weights.

    Args:
        model: the network, usually at its random initialisation (step 1 of the rule).
            Its weights and buffers are the same bit for bit afterwards.
        batches: an iterable of batches, one epoch of the training data (step 2).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the training loss of one batch
            (moving the batch to the model's device is up to it).
        optimizer: whose ε: a name of :func:`eps_optimizers` (default :data:`DEFAULT_OPTIMIZER`).
        betas, weight_decay: the optimizer's, as used in training.
        clip_grad_norm: max total gradient norm if training clips, else None.
        steps: stop after this many batches (default: all of ``batches``).
        low, high: the percentiles (default 2% and 98%, as in the paper).
        progress: a tqdm progress bar when tqdm is installed.
        bins: the histograms' :class:`~fasthist.LogBins` (default ``LogBins()``).
        exclude: tensors to leave out: a name or glob pattern, a list of them, or a
            predicate ``name -> bool`` (checked against the model's names before the pass);
            their gradients may be NaN/inf (module docstring).
        drop_dead: leave out the numerically dead values (rounding noise many decades below
            the model's bulk, :data:`fasthist.eps.DEAD_RATIO`); by default they are flagged
            (``rows[i].dead``, ``dead``) and counted, as in the paper.

    Returns:
        :class:`fasthist.EpsRange`: ``low``/``high`` (decade-rounded), ``low_raw``/``high_raw``,
        ``candidates`` (the decades to search), ``low_tensor``/``high_tensor`` (which tensor
        sets each bound), per-tensor ``rows``, ``dead``, ``paper``/``without_dead`` (both
        ranges), ``ambiguous``, ``to_dict()``.
    """
    _check_args(optimizer, betas, weight_decay, clip_grad_norm, steps, (low, high), model, exclude)
    opt = eps_pass(
        model,
        batches,
        loss_fn,
        optimizer=optimizer,
        betas=betas,
        weight_decay=weight_decay,
        clip_grad_norm=clip_grad_norm,
        steps=steps,
        progress=progress,
        bins=bins,
        exclude=exclude,
    )
    return _rule_on_last_step(opt, low, high, exclude, drop_dead)


def _rule_on_last_step(
    opt: torch.optim.Optimizer, low: float, high: float, exclude: Exclude, drop_dead: bool
) -> EpsRange:
    """The rule of :mod:`fasthist.eps` on the histograms of the pass's last step."""
    names, _, counts = opt.histogram_rows("step")  # type: ignore[attr-defined]
    return eps_range_from_counts(names, counts, opt.bins, low=low, high=high, exclude=exclude, drop_dead=drop_dead)  # type: ignore[attr-defined]


def grid_inside(grid: Iterable[float], rng: EpsRange) -> list[float]:
    """The grid values inside the decade-rounded range (with a little tolerance for
    values such as 1e-7 that are not exact powers of ten in binary)."""
    lo, hi = rng.low * (1 - 1e-9), rng.high * (1 + 1e-9)
    return [e for e in grid if lo <= e <= hi and math.isfinite(e)]
