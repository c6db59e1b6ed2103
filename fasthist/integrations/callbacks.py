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

Where param groups track staleness (``track=("sqrt_v", "staleness")``), beside these:

- ``{prefix}/staleness_rms_median``, ``{prefix}/staleness_rms_max`` (over the tensors
  tracking it, of their RMS staleness) and ``{prefix}/staleness_p99`` (of all their values
  together);
- ``{prefix}.staleness_rms/{name}`` and ``{prefix}.staleness_p99/{name}`` per chosen tensor
  (:func:`fasthist.integrations.metrics.staleness_scalars`);
- with ``alert`` (:class:`fasthist.health.StalenessAlert`, fed the per-tensor RMS staleness
  of every logging step: it sees only those steps), ``{prefix}/staleness_alert``: 1 while an
  episode lasts, else 0. The alert warns once per episode; its ``episodes`` record the
  steps.

Values that are not finite (a tensor with no nonzero value yet) are left out, and so are
the per-tensor keys of a chosen tensor that has no counts yet (not stepped: a frozen head).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..health import StalenessAlert
from ..histogram import int_arg
from ..names import declared
from ..wrapped import unwrap
from .metrics import (
    Selection,
    select,
    snapshot,
    staleness_scalars,
    summary_scalars,
    tensor_scalars,
    tracks_staleness,
)

__all__ = ["ALERT_DOC", "CallbackCore", "fasthist_optimizer"]

ALERT_DOC = """\
    ``alert``: None (default), True (a :class:`fasthist.health.StalenessAlert` with its
    defaults) or an alert of your own: fed the per-tensor RMS staleness at every logging
    step, it warns once per episode and records it (``callback.alert.episodes``); needs an
    optimizer tracking staleness (``track=("sqrt_v", "staleness")``), else ``ValueError``
    at train start. Log every step (``every_n_steps=1``) for it to see every step.
"""
"""The docstring paragraph of the callbacks' ``alert`` option."""


def _check_alert(alert: Any) -> StalenessAlert | None:
    if alert is None or alert is False:
        return None
    if alert is True:
        return StalenessAlert()
    if not isinstance(alert, StalenessAlert):
        raise ValueError(f"Invalid alert: {alert!r}; expected None, a bool or a fasthist.health.StalenessAlert")
    return alert


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
        alert: Any = None,
    ) -> None:
        self.alert = _check_alert(alert)
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
        if self.alert is not None and not tracks_staleness(opt):
            raise ValueError(
                f"{self.owner}: alert needs the optimizer to track staleness; pass track=('sqrt_v', 'staleness')"
            )

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
        stale, stale_summary = staleness_scalars(opt, self.window)
        out = {f"{self.prefix}/{k}": v for k, v in {**summary_scalars(snap), **stale_summary}.items()}
        if self.alert is not None and stale:
            self.alert.update(step, {n: row["staleness_rms"] for n, row in stale.items()})
            out[f"{self.prefix}/staleness_alert"] = float(self.alert.active)
        if self.max_tensors != 0:
            if self._chosen is None:
                self._warn_too_many(len(snap.names))
            else:
                rows = tensor_scalars(snap)
                for name in self._chosen:
                    row = {**rows.get(name, {}), **stale.get(name, {})}
                    out.update({f"{self.prefix}.{k}/{name}": v for k, v in row.items()})
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
