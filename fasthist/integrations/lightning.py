"""A Lightning callback that logs a fasthist optimizer's histograms.

Importing this module imports Lightning (``lightning.pytorch``, or the standalone
``pytorch_lightning`` where only that is installed; ``pip install "fasthist[lightning]"``);
``import fasthist`` never does.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
    except ImportError as e:
        raise ImportError('fasthist.integrations.lightning needs Lightning: pip install "fasthist[lightning]"') from e

from ..health import StalenessAlert
from ..histogram import int_arg
from . import tensorboard
from .callbacks import ALERT_DOC, CallbackCore, fasthist_optimizer
from .metrics import Selection

__all__ = ["HistogramCallback"]

_OWNER = "fasthist.integrations.lightning.HistogramCallback"


class HistogramCallback(Callback):
    """Log the √v̂ histograms' percentiles, adaptive share and ε range of the fasthist
    optimizer through the Trainer's loggers (``logger.log_metrics`` of every logger in
    ``trainer.loggers``: CSV, TensorBoard, W&B, MLflow, ...), at the step Lightning logs
    that batch's own metrics at (``self.log`` in ``training_step``): ``global_step - 1``.

    When: at the end of the training batch whose optimizer step makes ``global_step`` a
    multiple of ``every_n_steps`` (default: ``trainer.log_every_n_steps``); once per step
    (with gradient accumulation, after the batch that stepped). Nothing is read from the
    device on the batches in between; a logging step copies the histogram counts to the
    host once (once more per logger that gets full histograms).

    What (keys in :mod:`fasthist.integrations.callbacks`): over all tracked tensors
    p2/p50/p98 of √v̂, the share above each group's ε, and the ε range; per tensor
    p2/p50/p98 and that share, for the tensors chosen by ``tensors`` (exact names, glob
    patterns or a predicate; default all) if they are at most ``max_tensors`` (default 64;
    None: no cap; 0: the summary only). Past the cap only the summary is logged, with one
    warning. ``tensors`` is checked against the optimizer's parameters at
    ``on_train_start`` (a name that is none of them raises ``ValueError`` there); a chosen
    tensor not stepped yet (frozen) is left out until it has counts.
    Name the tensors by giving the optimizer ``self.named_parameters()`` in
    ``configure_optimizers``.

    With ``histograms=True``, also the full histograms to each ``TensorBoardLogger``
    (:func:`fasthist.integrations.tensorboard.log_histograms`) and ``WandbLogger``
    (:func:`fasthist.integrations.wandb.log_histograms`, at ``trainer/global_step``).

    ``optimizer_index`` picks the optimizer in ``trainer.optimizers`` (default 0). An
    optimizer that is not a fasthist one (after :func:`fasthist.unwrap`) raises
    ``TypeError`` at ``on_train_start``, before the first step: the callback was added to
    log these metrics, and a run that silently logs none of them is worse than one that
    does not start.

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
        optimizer_index: int = 0,
        alert: Any = None,
    ) -> None:
        self.core = CallbackCore(_OWNER, every_n_steps, tensors, max_tensors, histograms, window, prefix, alert)
        self.optimizer_index = int_arg(optimizer_index, "optimizer_index", 0)
        self._opt: Any = None

    @property
    def alert(self) -> StalenessAlert | None:
        """The staleness alert fed at every logging step (``alert=``), with its episodes."""
        return self.core.alert

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = trainer.optimizers
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(
                f"Invalid optimizer_index: {self.optimizer_index}; the trainer has {len(optimizers)} optimizer(s)"
            )
        self._opt = fasthist_optimizer(optimizers[self.optimizer_index], _OWNER)
        self.core.start(self._opt, trainer.global_step)  # a resumed run logged that step already

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        every = self.core.every_n_steps or trainer.log_every_n_steps
        if self._opt is None or not every or step % every or not self.core.due(step, True):
            return
        metrics = self.core.metrics(self._opt, step)
        # Lightning logs a batch's metrics at the number of optimizer steps before it
        log_step = step - 1
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=log_step)
        if self.core.histograms:
            self._log_histograms(trainer, log_step)

    def _log_histograms(self, trainer: Any, step: int) -> None:
        core = self.core
        kwargs = {"window": core.window, "scalars": False, "prefix": core.prefix}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                tensorboard.log_histograms(logger.experiment, self._opt, step, **kwargs)
            elif isinstance(logger, WandbLogger):
                from . import wandb as fasthist_wandb

                fasthist_wandb.log_histograms(
                    logger.experiment, self._opt, step, step_metric="trainer/global_step", **kwargs
                )


HistogramCallback.__doc__ = f"{(HistogramCallback.__doc__ or '').rstrip()}\n\n{ALERT_DOC}"
