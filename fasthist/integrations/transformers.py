"""A Hugging Face ``Trainer`` callback that logs a fasthist optimizer's histograms.

Importing this module imports ``transformers`` (``pip install "fasthist[transformers]"``);
``import fasthist`` never does.
"""

from __future__ import annotations

import inspect
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        'fasthist.integrations.transformers needs transformers: pip install "fasthist[transformers]"'
    ) from e

from . import tensorboard
from .callbacks import CallbackCore, fasthist_optimizer
from .metrics import Selection

__all__ = ["HistogramCallback"]

_OWNER = "fasthist.integrations.transformers.HistogramCallback"


def _calling_trainer(callback: Any) -> Any:
    """The object up the call stack whose ``callback_handler`` holds ``callback`` (the
    Trainer calling it), or None."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if any(cb is callback for cb in getattr(handler, "callbacks", ())):
            return owner
        frame = frame.f_back
    return None


class HistogramCallback(TrainerCallback):
    """Log the √v̂ histograms' percentiles, adaptive share and ε range of the Trainer's
    fasthist optimizer through ``Trainer.log``, so that ``state.log_history``, the console
    and every ``report_to`` integration (TensorBoard, W&B, CSV, MLflow, ...) receive them.

    When: after the optimizer step of every ``every_n_steps``-th global step; by default
    (None) exactly when the Trainer logs its training loss (``logging_steps``,
    ``logging_first_step``, ``logging_strategy``). Each such step logs one more
    ``Trainer.log`` entry, before the loss entry of the same step. Nothing is read from the
    device on the steps in between; a logging step copies the histogram counts to the host
    once (once more per logger that gets full histograms).

    What (keys in :mod:`fasthist.integrations.callbacks`; the reporting integrations add
    their own prefix, e.g. ``train/``): over all tracked tensors p2/p50/p98 of √v̂, the share
    above each group's ε, and the ε range; per tensor p2/p50/p98 and that share, for the
    tensors chosen by ``tensors`` (names, glob patterns or a predicate; default all) if they
    are at most ``max_tensors`` (default 64; None: no cap; 0: the summary only). Past the
    cap only the summary is logged, with one warning: 4 keys per tensor swamp a logger's
    view of a large model, and the summary still holds the ε range.

    With ``histograms=True``, also the full histograms, through
    :func:`fasthist.integrations.tensorboard.log_histograms` to the writer of an active
    ``TensorBoardCallback`` and :func:`fasthist.integrations.wandb.log_histograms` to the
    run of an active ``WandbCallback`` (at step ``train/global_step``).

    The optimizer may be wrapped (Accelerate's ``AcceleratedOptimizer``): it is unwrapped
    with :func:`fasthist.unwrap`. Training with an optimizer that is not a fasthist one
    raises ``TypeError`` at ``on_train_begin``, before the first step: the callback was
    added to log these metrics, and a run that silently logs none of them is worse than
    one that does not start. ``trainer`` is found on the call stack (the Trainer whose
    callback handler holds this callback) unless given.
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
    ) -> None:
        self.core = CallbackCore(_OWNER, every_n_steps, tensors, max_tensors, histograms, window, prefix)
        self.trainer = self._given_trainer = trainer
        self._opt: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        # found anew at each train(): the callback may be handed to another Trainer
        self.trainer = self._given_trainer if self._given_trainer is not None else _calling_trainer(self)
        if self.trainer is None:
            raise RuntimeError(
                f"{_OWNER}: found no Trainer whose callback_handler holds it up the call stack; pass HistogramCallback(trainer=...)"
            )
        self._opt = fasthist_optimizer(optimizer if optimizer is not None else self.trainer.optimizer, _OWNER)
        self.core.last_step = state.global_step  # a resumed run logged that step already

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_log(state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._maybe_log(state, control)

    def _maybe_log(self, state: Any, control: Any) -> None:
        step = state.global_step
        if self._opt is None or not self.core.due(step, bool(control.should_log)):
            return
        metrics = self.core.metrics(self._opt, step)
        if metrics:
            should_log = control.should_log
            self.trainer.log(metrics)
            # Trainer.log clears should_log (its on_log does), which would drop the loss
            # entry the Trainer is about to log at this step
            control.should_log = self.trainer.control.should_log = should_log
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
