"""What the trainer callbacks (:mod:`.transformers`, :mod:`.lightning`) share, free of any
framework: their options, when a step logs, and the metrics it logs.

Keys (``prefix`` is ``"fasthist"`` by default):

- ``{prefix}/p02``, ``{prefix}/p50``, ``{prefix}/p98``, ``{prefix}/adaptive``: over all
  tracked tensors; ``{prefix}/eps_low``, ``{prefix}/eps_high`` (the ε range, in decades)
  and ``{prefix}/eps_low_raw``, ``{prefix}/eps_high_raw`` (see
  :func:`fasthist.integrations.metrics.summary_scalars`);
- ``{prefix}.p02/{name}``, ``{prefix}.p50/{name}``, ``{prefix}.p98/{name}``,
  ``{prefix}.adaptive/{name}`` per tensor, named as the optimizer names it (the names
  given to it, else ``"{group}.{index}"``), the keys of
  :func:`fasthist.integrations.tensorboard.log_histograms`.

Values that are not finite (a tensor with no nonzero value yet) are left out, and so are
the per-tensor keys of a chosen tensor that has no counts yet (not stepped: a frozen head).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..histogram import int_arg
from ..names import declared
from ..wrapped import unwrap
from .metrics import Selection, select, snapshot, summary_scalars, tensor_scalars

__all__ = ["CallbackCore", "fasthist_optimizer"]


def fasthist_optimizer(opt: Any, owner: str) -> Any:
    """The fasthist optimizer in ``opt`` (unwrapped), or a ``TypeError`` saying ``owner``
    needs one."""
    try:
        return unwrap(opt)
    except TypeError as e:
        from ..catalog import declarations  # imports every optimizer: only on this error

        raise TypeError(
            f"{owner} needs a fasthist optimizer (declared: {', '.join(declarations())}) to read histograms "
            f"from; the trainer's optimizer is not one: {e}"
        ) from None


class CallbackCore:
    """Options and logic of a histogram callback; see the callbacks' docstrings."""

    def __init__(
        self,
        owner: str,
        every_n_steps: int | None,
        tensors: Selection,
        max_tensors: int | None,
        histograms: bool,
        window: str,
        prefix: str,
    ) -> None:
        self.every_n_steps = int_arg(every_n_steps, "every_n_steps", 1, allow_none=True)
        self.max_tensors = int_arg(max_tensors, "max_tensors", 0, allow_none=True)
        if window not in ("step", "total"):
            raise ValueError(f"Invalid window: {window!r}; expected 'step' or 'total'")
        if not isinstance(histograms, bool):
            raise ValueError(f"Invalid histograms value: {histograms!r}; expected a bool")
        self.owner = owner
        self.tensors = tensors
        self.histograms = histograms
        self.window = window
        self.prefix = prefix
        self.last_step = 0
        self._chosen: list[str] | None = []
        self._warned = False

    def start(self, opt: Any, step: int) -> None:
        """At train start, before the first step: ``tensors`` is checked against the names
        of every parameter ``opt`` tracks, stepped yet or not (a name or pattern that
        matches none is a ``ValueError`` now, not at the first logging step), and ``step``
        (a resumed run's, logged already) is the last step logged."""
        self._chosen = select(declared(opt.param_groups), self.tensors, self.max_tensors)
        self.last_step = step

    def due(self, step: int, trainer_logs: bool) -> bool:
        """Whether optimizer step ``step`` logs: every ``every_n_steps`` steps, or (None)
        whenever the trainer logs (``trainer_logs``); once per step at most."""
        if step <= self.last_step:
            return False
        return trainer_logs if self.every_n_steps is None else step % self.every_n_steps == 0

    def metrics(self, opt: Any, step: int) -> dict[str, float]:
        """The metrics of ``opt`` now, as a flat dict (see the module docstring); marks
        ``step`` as logged. Per tensor, only the chosen tensors with counts so far (a
        frozen one has none until it is stepped). The one host copy of a logging step."""
        self.last_step = step
        snap = snapshot(opt, self.window)
        if snap is None:
            return {}
        out = {f"{self.prefix}/{k}": v for k, v in summary_scalars(snap).items()}
        if self.max_tensors != 0:
            if self._chosen is None:
                self._warn_too_many(len(snap.names))
            else:
                rows = tensor_scalars(snap)
                for name in self._chosen:
                    out.update({f"{self.prefix}.{k}/{name}": v for k, v in rows.get(name, {}).items()})
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def _warn_too_many(self, n: int) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"{self.owner}: more than max_tensors={self.max_tensors} tensors are selected for per-tensor "
            f"metrics ({n} tracked); logging the summary over all tensors only. Pass tensors=[...] (names or "
            "glob patterns) to pick some, max_tensors=None for all, or max_tensors=0 to silence this",
            stacklevel=4,
        )
