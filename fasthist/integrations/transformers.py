"""A Hugging Face ``Trainer`` callback that logs a fasthist optimizer's histograms.

Importing this module imports ``transformers`` (``pip install "fasthist[transformers]"``);
``import fasthist`` never does.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        'fasthist.integrations.transformers needs transformers: pip install "fasthist[transformers]"'
    ) from e

from ..health import StalenessAlert
from . import tensorboard
from .callbacks import ALERT_DOC, CallbackCore, fasthist_optimizer
from .metrics import Selection

__all__ = ["HistogramCallback"]

_OWNER = "fasthist.integrations.transformers.HistogramCallback"


def _holds(trainer: Any, callback: Any) -> bool:
    return any(cb is callback for cb in trainer.callback_handler.callbacks)


class HistogramCallback(TrainerCallback):
    """Log the √v̂ histograms' percentiles, adaptive share and ε range of the Trainer's
    fasthist optimizer to every logging integration of the Trainer (``report_to``:
    TensorBoard, W&B, MLflow, ...).

    Attach it to its Trainer, which it needs to reach the loggers::

        trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
        HistogramCallback().attach(trainer)  # adds itself to trainer's callbacks

    (or ``trainer.add_callback(HistogramCallback(trainer=trainer))``). Training with a
    callback that is not attached, or attached to another Trainer than the one running it,
    raises ``RuntimeError`` at ``on_train_begin``, before the first step.

    When: after the optimizer step of every ``every_n_steps``-th global step; by default
    (None) exactly when the Trainer logs its training loss (``logging_steps``,
    ``logging_first_step``, ``logging_strategy``). Nothing is read from the device on the
    steps in between; a logging step copies the histogram counts to the host once (once
    more per logger that gets full histograms). The Trainer's own control flow is left
    alone: the metrics are handed to the callbacks' ``on_log`` directly, not through
    ``Trainer.log``, whose event handler would clear ``control.should_log`` and drop the
    loss entry of the same step.

    What (keys in :mod:`fasthist.integrations.callbacks`; the reporting integrations add
    their own prefix, e.g. ``train/``):

    - the summary, over all tracked tensors: p2/p50/p98 of √v̂, the share above each
      group's ε, and the ε range (9 numbers). It goes where ``Trainer.log`` sends a log
      entry: ``state.log_history``, the console line (``ProgressCallback`` or
      ``PrinterCallback``) and every callback's ``on_log``;
    - per tensor, p2/p50/p98 and that share, for the tensors chosen by ``tensors`` (exact
      names, glob patterns or a predicate; default all) if they are at most
      ``max_tensors`` (default 64; None: no cap; 0: the summary only). These go to the
      logging integrations only (the callbacks of ``transformers.integrations``, whether
      from ``report_to`` or added by hand), never to the console or ``log_history``: 4
      keys per tensor would make each console line and ``trainer_state.json`` entry
      thousands of characters long. Past the cap only the summary is logged, with one
      warning. ``tensors`` is checked against the optimizer's parameters at
      ``on_train_begin`` (a name that is none of them raises ``ValueError`` there); a
      chosen tensor not stepped yet (frozen) is left out until it has counts.

    With ``histograms=True``, also the full histograms, through
    :func:`fasthist.integrations.tensorboard.log_histograms` to the writer of an active
    ``TensorBoardCallback`` and :func:`fasthist.integrations.wandb.log_histograms` to the
    run of an active ``WandbCallback`` (at step ``train/global_step``).

    The optimizer may be wrapped (Accelerate's ``AcceleratedOptimizer``): it is unwrapped
    with :func:`fasthist.unwrap`. Training with an optimizer that is not a fasthist one
    raises ``TypeError`` at ``on_train_begin``, before the first step: the callback was
    added to log these metrics, and a run that silently logs none of them is worse than
    one that does not start.

    Where the optimizer tracks staleness (``track=("sqrt_v", "staleness")``), the RMS staleness
    and its p99 are logged beside these, over all tensors and per chosen tensor (keys in
    :mod:`fasthist.integrations.callbacks`).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        tensors: Selection = None,
        max_tensors: int | None = 64,
        histograms: bool = False,
        window: str = "step",
        prefix: str = "fasthist",
        trainer: Any = None,
        alert: Any = None,
    ) -> None:
        self.core = CallbackCore(_OWNER, every_n_steps, tensors, max_tensors, histograms, window, prefix, alert)
        self.trainer = trainer
        self._opt: Any = None

    def attach(self, trainer: Any) -> HistogramCallback:
        """Log through ``trainer`` from now on, and add this callback to its callbacks
        unless it holds it already. Returns the callback."""
        self.trainer = trainer
        if not _holds(trainer, self):
            trainer.add_callback(self)
        return self

    @property
    def alert(self) -> StalenessAlert | None:
        """The staleness alert fed at every logging step (``alert=``), with its episodes."""
        return self.core.alert

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.trainer is None:
            raise RuntimeError(
                f"{_OWNER} is not attached to a Trainer; call callback.attach(trainer), which also adds it to the "
                "trainer's callbacks, or pass HistogramCallback(trainer=trainer)"
            )
        if not _holds(self.trainer, self):
            raise RuntimeError(
                f"{_OWNER} is attached to a Trainer that does not hold it in its callbacks, so it is run by "
                "another one; call callback.attach(trainer) with the Trainer that trains"
            )
        self._opt = fasthist_optimizer(optimizer if optimizer is not None else self.trainer.optimizer, _OWNER)
        self.core.start(self._opt, state.global_step)  # a resumed run logged that step already

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_log(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_log(args, state, control)

    def _maybe_log(self, args: Any, state: Any, control: Any) -> None:
        step = state.global_step
        if self._opt is None or not self.core.due(step, bool(control.should_log)):
            return
        metrics = self.core.metrics(self._opt, step)
        summary = {k: v for k, v in metrics.items() if k.startswith(f"{self.core.prefix}/")}
        if summary:
            state.log_history.append({**summary, "step": step})  # as Trainer.log records an entry
        # every logging integration (report_to's, or added by hand) gets everything; the
        # console printers and the user's callbacks the summary
        from transformers.integrations import INTEGRATION_TO_CALLBACK

        loggers = tuple(INTEGRATION_TO_CALLBACK.values())
        for cb in self.trainer.callback_handler.callbacks:
            logs = metrics if isinstance(cb, loggers) else summary
            if cb is not self and logs:
                cb.on_log(args, state, control, logs=dict(logs))
        if self.core.histograms:
            self._log_histograms(step)

    def _log_histograms(self, step: int) -> None:
        """The full histograms to the active TensorBoard writer and W&B run, if any."""
        from transformers.integrations import TensorBoardCallback, WandbCallback

        core = self.core
        kwargs = {"window": core.window, "scalars": False, "prefix": core.prefix}
        for cb in self.trainer.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback) and getattr(cb, "tb_writer", None) is not None:
                tensorboard.log_histograms(cb.tb_writer, self._opt, step, **kwargs)
            elif isinstance(cb, WandbCallback) and getattr(cb, "_initialized", False):
                import wandb

                from . import wandb as fasthist_wandb

                if wandb.run is not None:
                    fasthist_wandb.log_histograms(wandb.run, self._opt, step, step_metric="train/global_step", **kwargs)


HistogramCallback.__doc__ = f"{(HistogramCallback.__doc__ or '').rstrip()}\n\n{ALERT_DOC}"
