"""Loss spikes made on purpose, and whether second-moment staleness warns before them.

Natural loss spikes are rare at the embedded tasks' scale, so a trial trains the ``gpt``
task with the default optimizer (:func:`fasthist.catalog.default`) and decoupled weight
decay and, once the loss has settled, changes one thing at step ``at``:

- ``lr10`` / ``lr3``: the learning rate jumps 10x / 3x (the classic spike);
- ``data``: the batches switch to a different text, Python source code from the standard
  library (a distribution shift);
- ``none``: nothing (a healthy run: every alert in it is a false alarm).

Every step records the loss, the global gradient norm and each tensor's RMS staleness
``sqrt(mean(g² / max(v̂, ε²)))`` (:mod:`fasthist.health`), computed exactly with torch ops
from ``opt.state`` and the gradient, and also read off a LogBins histogram of the
staleness with :func:`fasthist.health.rms_from_counts` (the two agree within its stated
error). :func:`evaluate` then replays an alert rule over the records: which spikes it
warned of, how many steps ahead, and how often it fired with no spike to follow.
"""

from __future__ import annotations

import inspect
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..bins import LogBins
from ..catalog import default, optimizer_class
from ..health import StalenessAlert, rms_from_counts
from .base import Task

__all__ = ["SCENARIOS", "Trial", "Verdict", "evaluate", "run_trial", "spike_onsets"]

SCENARIOS = {
    "lr10": "learning rate x10",
    "lr3": "learning rate x3",
    "data": "batches switch to Python source code",
    "none": "no change (healthy run)",
}
#: A spike: the loss above ``RISE`` times its median over the previous ``SPIKE_WINDOW`` steps.
RISE, SPIKE_WINDOW = 1.2, 50
#: How far ahead a warning counts for a spike (Wortsman et al. 2023: spikes follow 1-8 steps).
LEAD = 8


@dataclass
class Trial:
    """One training run's records (one entry per step)."""

    scenario: str
    seed: int
    at: int
    names: list[str]
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    rms: list[list[float]] = field(default_factory=list)  # per tensor, exact
    rms_hist: list[list[float]] = field(default_factory=list)  # per tensor, from the histogram


def _code_batches(task: Task, seed: int) -> list[Tensor]:
    """Batches of Python source (a few standard-library modules), shaped like the task's."""
    import argparse
    import collections
    import typing

    text = "".join(inspect.getsource(m) for m in (argparse, collections, typing, inspect))
    ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)
    span = task.seq_len + 1  # type: ignore[attr-defined]
    seqs = ids[: len(ids) // span * span].view(-1, span)
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))
    size = task.batch_size  # type: ignore[attr-defined]
    return [seqs[idx].to(task.device) for idx in perm.split(size) if len(idx) == size]


def _intervene(trial: Trial, opt: torch.optim.Optimizer, lr: float) -> None:
    if trial.scenario.startswith("lr"):
        for group in opt.param_groups:
            group["lr"] = lr * float(trial.scenario[2:])


@torch.no_grad()
def _staleness(opt: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor], bins: LogBins) -> tuple:
    """Per tensor: the exact RMS staleness, and the one read off its histogram."""
    exact, counts = [], []
    for p, g in zip(params, grads, strict=True):
        state, group = opt.state[p], opt.param_groups[0]
        vhat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
        s = g.abs() / vhat.sqrt().clamp_min(group["eps"])
        exact.append(float(s.double().square().mean().sqrt()))
        counts.append(bins.count(s))
    est = rms_from_counts(torch.stack(counts), bins).estimate.tolist()
    return exact, est


def run_trial(task: Task, scenario: str, *, steps: int, at: int, beta2: float = 0.999) -> Trial:
    """Train a fresh model of ``task`` (its seed) with decoupled weight decay for ``steps`` steps, changing what
    ``scenario`` says at step ``at`` (module docstring), and record every step."""
    if scenario not in SCENARIOS:
        raise ValueError(f"Invalid scenario: {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    model: nn.Module = task.model()
    names, params = zip(*model.named_parameters(), strict=True)
    opt = optimizer_class(default())(
        model.named_parameters(),
        lr=task.lr,
        betas=(0.9, beta2),
        weight_decay=0.01,
        decoupled_weight_decay=True,
        track=False,
    )
    trial = Trial(scenario, task.seed, at, list(names))
    batches = [b for epoch in range(math.ceil(steps / max(1, len(task.batches(0)))) + 1) for b in task.batches(epoch)]
    code = _code_batches(task, task.seed) if scenario == "data" else []
    bins = LogBins()
    model.train()
    for t in range(steps):
        if t == at:
            _intervene(trial, opt, task.lr)
        batch = code[(t - at) % len(code)] if code and t >= at else batches[t]
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        opt.step()
        exact, est = _staleness(opt, list(params), grads, bins)
        trial.loss.append(float(loss.detach()))
        trial.grad_norm.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        trial.rms.append(exact)
        trial.rms_hist.append(est)
    return trial


def spike_onsets(loss: Sequence[float], *, rise: float = RISE, window: int = SPIKE_WINDOW, gap: int = 20) -> list[int]:
    """Steps where a spike starts: the loss above ``rise`` times its median over the previous
    ``window`` steps, after at least ``gap`` steps that were not (NaN counts as a spike)."""
    onsets, last = [], -(10**9)
    for t in range(window, len(loss)):
        median = statistics.median(loss[t - window : t])
        if math.isnan(loss[t]) or loss[t] > rise * median:
            if t - last > gap:
                onsets.append(t)
            last = t
    return onsets


@dataclass
class Verdict:
    """How one alert rule did over a set of trials."""

    spikes: int
    warned: int
    leads: list[int]  # steps from the warning to the spike, one per warned spike
    alerts: int
    false_alarms: int
    steps: int

    @property
    def false_alarms_per_1000_steps(self) -> float:
        return 1000.0 * self.false_alarms / max(1, self.steps)


def evaluate(trials: Sequence[Trial], signal: Callable[[Trial, int], Any], **rule: float) -> Verdict:
    """Replay :class:`~fasthist.health.StalenessAlert` (``rule``: its keyword arguments) over
    each trial's ``signal(trial, t)`` (the per-tensor values of step ``t``). A spike is warned
    of when an episode starts at most :data:`LEAD` steps before its onset (the onset step
    included); an episode with no onset in its next ``LEAD`` steps is a false alarm."""
    spikes = warned = alerts = false_alarms = steps = 0
    leads: list[int] = []
    for trial in trials:
        alert = StalenessAlert(warn=False, **rule)  # type: ignore[arg-type]
        for t in range(len(trial.loss)):
            alert.update(t, signal(trial, t))
        starts = [e.start for e in alert.episodes]
        onsets = spike_onsets(trial.loss)
        spikes += len(onsets)
        for onset in onsets:
            before = [onset - s for s in starts if 0 <= onset - s <= LEAD]
            if before:
                warned += 1
                leads.append(max(before))
        alerts += len(starts)
        false_alarms += sum(not any(0 <= o - s <= LEAD for o in onsets) for s in starts)
        steps += len(trial.loss)
    return Verdict(spikes, warned, leads, alerts, false_alarms, steps)
