"""The fasthist optimizer inside a training framework's wrapper.

Hugging Face ``Trainer.optimizer`` and ``accelerator.prepare(opt)`` return Accelerate's
``AcceleratedOptimizer``; Lightning hands ``LightningOptimizer`` to hooks; DeepSpeed and
others wrap the same way. Each keeps the optimizer it wraps in ``.optimizer``:
:func:`unwrap` follows that chain to the fasthist optimizer, so every query and integration
takes either.
"""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap"]

_MAX_DEPTH = 16


def unwrap(opt: Any) -> Any:
    """``opt`` if it is a fasthist optimizer, else the first fasthist optimizer down its
    ``.optimizer`` chain (at most 16 links; a cycle ends it). Raises ``TypeError`` naming
    the chain when there is none."""
    from .optimizer import HistogramMixin  # torch only when called

    seen: list[Any] = []
    current = opt
    while len(seen) < _MAX_DEPTH:
        if isinstance(current, HistogramMixin):
            return current
        seen.append(current)
        inner = getattr(current, "optimizer", None)
        if inner is None or any(inner is s for s in seen):
            break
        current = inner
    chain = " -> ".join(type(s).__name__ for s in seen)
    raise TypeError(
        f"expected a fasthist optimizer (or a wrapper of one, through .optimizer), but got {chain}: "
        "none of them is a fasthist optimizer"
    )
