r"""The ε-range rule of Silva & Rodriguez (arXiv 2311.11532) on a model and its data.

One pass over ``batches`` at the model's current weights, which are never changed:
for every batch the gradient of ``loss_fn(model, batch)`` is computed, clipped
(``clip_grad_norm``) and, for optimizers with coupled weight decay, has
``weight_decay * θ`` added, exactly as the user's training would; the optimizer's
moment estimates are updated, the weights are not. At the last step, per parameter
tensor, the quantity ε competes with (``sqrt(v_hat)`` for Adam/AdamW) is histogrammed
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
the pass and set back to ``-0.0`` after every step. Gradients are checked to be finite
at each step. Buffers (BatchNorm running statistics, ...) are restored after the pass,
and each parameter's ``.grad`` is put back as it was.

Other optimizers plug in through :func:`register_eps_optimizer`: a factory that builds a
fasthist optimizer with the same moment update and a zero step. Each histograms what its ε
is added to, in ε's units (the ``quantity`` of its registration below; the optimizer's
docstring has the details), as the paper's rule carries over from Adam: Silva & Rodriguez,
"Fine-Tuning Adaptive Stochastic Optimizers: Determining the Optimal Hyperparameter ε via
Gradient Magnitude Histogram Analysis" (arXiv 2311.11532, 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .adam import Adam, AdamW
from .bins import LogBins
from .eps import EpsRange
from .progress import progress_bar

__all__ = [
    "EpsOptimizer",
    "estimate_eps_range",
    "eps_pass",
    "eps_optimizers",
    "register_eps_optimizer",
]


@dataclass(frozen=True)
class EpsOptimizer:
    """How the rule runs for one optimizer.

    ``factory(named_params, betas=..., weight_decay=..., bins=...)`` returns a fasthist
    optimizer (with the histogram queries of :class:`fasthist.optimizer.HistogramMixin`)
    whose ``step()`` updates the moments as the real optimizer would and leaves every
    weight bit for bit unchanged (zero learning rate). ``quantity`` names what its
    histograms hold, for messages and plots.
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    quantity: str


_REGISTRY: dict[str, EpsOptimizer] = {}


def register_eps_optimizer(
    name: str, factory: Callable[..., torch.optim.Optimizer], *, quantity: str, replace: bool = False
) -> None:
    """Make ``optimizer=name`` available to :func:`estimate_eps_range` (see :class:`EpsOptimizer`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid optimizer name: {name!r}; expected a non-empty str")
    if name in _REGISTRY and not replace:
        raise ValueError(f"optimizer {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = EpsOptimizer(name, factory, quantity)


def eps_optimizers() -> list[str]:
    """Names accepted by ``optimizer=``."""
    return sorted(_REGISTRY)


def _adam(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> Adam:
    # Coupled weight decay: torch's Adam adds weight_decay * param to the gradient.
    return Adam(params, lr=0.0, betas=betas, eps=1.0, weight_decay=weight_decay, bins=bins)


def _adamw(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> AdamW:
    # Decoupled weight decay never reaches the moments; with lr=0 it scales weights by 1.0.
    return AdamW(params, lr=0.0, betas=betas, eps=1.0, weight_decay=weight_decay, bins=bins)


register_eps_optimizer("adam", _adam, quantity="sqrt(v_hat)")
register_eps_optimizer("adamw", _adamw, quantity="sqrt(v_hat)")


def _rmsprop(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> Any:
    # betas[1] is RMSprop's alpha (torch's default is 0.99: pass betas=(0.9, 0.99) for it);
    # weight decay is coupled (enters v); lr=0 and eps=1 as for Adam.
    from .rmsprop import RMSprop

    return RMSprop(params, lr=0.0, alpha=betas[1], eps=1.0, weight_decay=weight_decay, bins=bins)


def _rmsprop_centered(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> Any:
    from .rmsprop import RMSprop

    return RMSprop(params, lr=0.0, alpha=betas[1], eps=1.0, weight_decay=weight_decay, centered=True, bins=bins)


def _adagrad(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> Any:
    # no betas; coupled weight decay; initial_accumulator_value 0 as torch's default
    from .adagrad import Adagrad

    return Adagrad(params, lr=0.0, eps=1.0, weight_decay=weight_decay, bins=bins)


def _adabelief(params: Any, *, betas: tuple[float, float], weight_decay: float, bins: LogBins | None) -> Any:
    # eps enters AdaBelief's state (the histogram would have a floor at eps, where dead
    # elements pile up instead of being exact zeros), so the pass runs with eps=0: the
    # eps-free (1-beta2)*EMA_hat((g-m)^2). fasthist.AdaBelief skips the update at lr=0, so
    # 0/0 never reaches the weights. Decoupled decay (the package default) never reaches
    # the moments.
    from .adabelief import AdaBelief

    return AdaBelief(params, lr=0.0, betas=betas, eps=0.0, weight_decay=weight_decay, bins=bins)


register_eps_optimizer("rmsprop", _rmsprop, quantity="sqrt(v)")
register_eps_optimizer("rmsprop-centered", _rmsprop_centered, quantity="sqrt(v - g_avg^2)")
register_eps_optimizer("adagrad", _adagrad, quantity="sqrt(sum g^2)")
register_eps_optimizer("adabelief", _adabelief, quantity="(1-beta2)*s_hat")


def _check_args(
    optimizer: str, betas: tuple[float, float], weight_decay: float, clip_grad_norm: float | None, steps: int | None
) -> EpsOptimizer:
    spec = _REGISTRY.get(optimizer) if isinstance(optimizer, str) else None
    if spec is None:
        raise ValueError(f"Invalid optimizer: {optimizer!r}; expected one of {', '.join(eps_optimizers())}")
    if len(tuple(betas)) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas}; expected two values in [0, 1)")
    if not 0.0 <= float(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if clip_grad_norm is not None and not float(clip_grad_norm) > 0.0:
        raise ValueError(f"Invalid clip_grad_norm: {clip_grad_norm}; expected a positive float or None")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"Invalid steps: {steps!r}; expected a positive int or None")
    return spec


def eps_pass(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    optimizer: str = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = None,
    steps: int | None = None,
    progress: bool = True,
    bins: LogBins | None = None,
) -> torch.optim.Optimizer:
    """The pass of :func:`estimate_eps_range`, returning the fasthist optimizer whose
    moments and histograms it filled: query it with ``eps_range()``, ``histograms()``,
    ``quantiles()``, or plot it with :mod:`fasthist.plot`."""
    spec = _check_args(optimizer, betas, weight_decay, clip_grad_norm, steps)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad")
    params = [p for _, p in named]
    opt = spec.factory(named, betas=tuple(float(b) for b in betas), weight_decay=float(weight_decay), bins=bins)

    saved_grads = [p.grad for p in params]
    negative_zeros = []  # (param, mask), only for the rare params that hold a -0.0
    with torch.no_grad():
        for p in params:
            r = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
            mask = (r == 0) & torch.signbit(r)
            if bool(mask.any()):
                negative_zeros.append((r, mask))
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    total = steps
    if hasattr(batches, "__len__"):
        n_batches = len(batches)  # type: ignore[arg-type]
        total = n_batches if steps is None else min(steps, n_batches)
    bar = progress_bar(total, f"eps-range ({optimizer})", enabled=progress, unit="batch")
    done = 0
    try:
        for batch in batches:
            for p in params:
                p.grad = None
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise TypeError(f"loss_fn must return a one-element Tensor, but got {type(loss).__name__}")
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, float(clip_grad_norm))
            if grads:
                peak = torch.stack([g.detach().abs().amax().to(torch.float32) for g in grads]).amax()
                if not bool(torch.isfinite(peak)):
                    raise RuntimeError(f"non-finite gradient at batch {done}; the ε-range rule needs finite gradients")
            opt.step()
            with torch.no_grad():
                for r, mask in negative_zeros:
                    r.masked_fill_(mask, -0.0)
            done += 1
            if bar is not None:
                bar.update(1)
            if steps is not None and done >= steps:
                break  # before fetching another batch
    finally:
        if bar is not None:
            bar.close()
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
        with torch.no_grad():
            for b, v in saved_buffers:
                b.copy_(v)
    if done == 0:
        raise ValueError("batches yielded no batch")
    return opt


def estimate_eps_range(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    optimizer: str = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = None,
    steps: int | None = None,
    low: float = 0.02,
    high: float = 0.98,
    progress: bool = True,
    bins: LogBins | None = None,
) -> EpsRange:
    r"""The paper's ε search range for ``model`` at its current weights.

    Args:
        model: the network, usually at its random initialisation (step 1 of the rule).
            Its weights and buffers are the same bit for bit afterwards.
        batches: an iterable of batches, one epoch of the training data (step 2).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the training loss of one batch
            (moving the batch to the model's device is up to it).
        optimizer: whose ε the range is for: ``"adam"`` (coupled ``weight_decay``),
            ``"adamw"`` (decoupled, so it does not enter the moments), or any name added
            with :func:`register_eps_optimizer`.
        betas, weight_decay: the optimizer's, as used in training.
        clip_grad_norm: max total gradient norm if training clips, else None.
        steps: stop after this many batches (default: all of ``batches``).
        low, high: the percentiles (default 2% and 98%, as in the paper).
        progress: a tqdm progress bar when tqdm is installed.
        bins: the histograms' :class:`~fasthist.LogBins` (default ``LogBins()``).

    Returns:
        :class:`fasthist.EpsRange`: ``low``/``high`` (decade-rounded), ``low_raw``/``high_raw``,
        ``candidates`` (the decades to search), per-tensor ``rows``, ``ambiguous``, ``to_dict()``.
    """
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
    )
    return opt.eps_range(low, high)  # type: ignore[attr-defined]


def grid_inside(grid: Iterable[float], rng: EpsRange) -> list[float]:
    """The grid values inside the decade-rounded range (with a little tolerance for
    values such as 1e-7 that are not exact powers of ten in binary)."""
    lo, hi = rng.low * (1 - 1e-9), rng.high * (1 + 1e-9)
    return [e for e in grid if lo <= e <= hi and math.isfinite(e)]
