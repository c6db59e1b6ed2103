"""What a task provides, and the training loop ``fasthist sweep`` runs once per ε."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..catalog import default, optimizer_class
from ..recorder import QuantileRecorder, QuantileTrace

__all__ = ["Task", "TrainResult", "train"]


class Task:
    """A model family, its data and its validation metric.

    Subclasses set the class attributes and implement :meth:`model`, :meth:`batches`,
    :meth:`loss` and :meth:`evaluate`.
    """

    name: str = ""
    metric: str = ""  # "accuracy" (percent) or "perplexity"
    higher_is_better: bool = True
    eps_grid: tuple[float, ...] = ()
    epochs: int = 1
    lr: float = 1e-3
    clip_grad_norm: float | None = None

    def __init__(self, *, seed: int = 0, device: str = "cpu") -> None:
        self.seed = seed
        self.device = torch.device(device)

    def model(self) -> nn.Module:
        """A fresh model at the seed's random initialisation, on the task's device."""
        raise NotImplementedError

    def batches(self, epoch: int) -> list[Any]:
        """The training batches of one epoch, in the seed's order for that epoch."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> float:
        """The validation metric of ``model``."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def better(self, a: float, b: float) -> bool:
        """Whether metric ``a`` beats ``b`` (NaN never does)."""
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a > b if self.higher_is_better else a < b


@dataclass
class TrainResult:
    eps: float
    metric: float
    final_loss: float
    steps: int
    seconds: float
    adaptive_share: float  # share of all sqrt(v_hat) above eps at the last step
    trace: QuantileTrace | None = field(default=None, repr=False)


def train(
    task: Task,
    *,
    eps: float,
    lr: float,
    epochs: int,
    steps: int | None = None,
    record_every: int = 0,
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train a fresh model of ``task`` with fasthist's default optimizer
    (:func:`fasthist.catalog.default`) at ``lr`` and ``eps`` and evaluate it.

    ``steps`` caps the total number of optimizer steps; ``record_every > 0`` records the
    per-tensor 2/50/98% quantiles of sqrt(v_hat) with a :class:`QuantileRecorder`;
    ``progress(n)`` is called after every step.
    """
    model = task.model()
    opt = optimizer_class(default())(model.named_parameters(), lr=lr, eps=eps)
    recorder = QuantileRecorder(opt, every=record_every, capacity=4096) if record_every > 0 else None
    t0 = time.perf_counter()
    done, last = 0, math.nan
    model.train()
    for epoch in range(epochs):
        for batch in task.batches(epoch):
            if steps is not None and done >= steps:
                break
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            loss.backward()
            if task.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), task.clip_grad_norm)
            opt.step()
            done += 1
            if progress is not None:
                progress(1)
        if steps is not None and done >= steps:
            break
    last = float(loss.detach()) if done else math.nan
    model.eval()
    metric = task.evaluate(model)
    share = opt.histogram().fraction_above(eps) if done else math.nan
    if recorder is not None:
        recorder.close()
    return TrainResult(
        eps=eps,
        metric=metric,
        final_loss=last,
        steps=done,
        seconds=time.perf_counter() - t0,
        adaptive_share=share,
        trace=recorder.trace() if recorder is not None else None,
    )
