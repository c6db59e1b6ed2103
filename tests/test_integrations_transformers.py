"""HistogramCallback in a real Hugging Face Trainer on the CPU: what reaches
``state.log_history``, the loggers, the console and TensorBoard's event files, against the
optimizer's own queries at each logging step."""

from __future__ import annotations

import math

import pytest
import torch

import fasthist
from tests._integration_helpers import (
    Tiny,
    data,
    expected,
    expected_staleness,
    optimizer,
    record_expected,
    staleness_optimizer,
    wandb_history,
)

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainingArguments  # noqa: E402

from fasthist.integrations.transformers import HistogramCallback  # noqa: E402


def train(tmp_path, callback, *, opt=None, max_steps=6, report_to="none", model=None, **args):
    """A Trainer over ``Tiny`` with ``callback`` attached (None: none; a callable: it attaches)."""
    model = Tiny() if model is None else model
    opt = optimizer(model) if opt is None else opt(model)
    x, y = data()
    ds = [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]
    targs = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, report_to=report_to,
        save_strategy="no", use_cpu=True, disable_tqdm=True, **{"logging_steps": 2, **args},
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=ds, optimizers=(opt, None))
    if callable(callback):
        callback(trainer)
    elif callback is not None:
        callback.attach(trainer)
    return trainer, opt


def fasthist_entries(trainer):
    return {e["step"]: e for e in trainer.state.log_history if any(k.startswith("fasthist") for k in e)}


def record_logger_calls(trainer):
    """What the Trainer's TensorBoardCallback receives through ``on_log``, as given."""
    from transformers.integrations import TensorBoardCallback

    (tb,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)]
    received, on_log = [], tb.on_log

    def recording(args, state, control, logs=None, **kwargs):
        received.append((state.global_step, dict(logs)))
        return on_log(args, state, control, logs=logs, **kwargs)

    tb.on_log = recording
    return received


def test_log_history_loggers_and_console_match_the_optimizer(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    trainer, opt = train(tmp_path, HistogramCallback(), report_to="tensorboard")
    want = record_expected(opt)
    received = record_logger_calls(trainer)
    trainer.train()
    got = fasthist_entries(trainer)
    assert sorted(got) == [2, 4, 6]  # logging_steps=2
    for step, entry in got.items():
        summary = {k: v for k, v in want[step].items() if k.startswith("fasthist/")}
        assert set(entry) == {*summary, "step"}  # the summary only: no per-tensor key in log_history
        for k, v in summary.items():
            assert math.isclose(entry[k], v, rel_tol=1e-12), (step, k, entry[k], v)
    # the logger receives every metric, per tensor and summary, at each logging step
    logged = {step: logs for step, logs in received if any(k.startswith("fasthist") for k in logs)}
    assert sorted(logged) == [2, 4, 6]
    for step, logs in logged.items():
        ref = want[step]
        assert set(ref) <= set(logs)
        for k, v in ref.items():
            assert math.isclose(logs[k], v, rel_tol=1e-12), (step, k, logs[k], v)
        assert logs["fasthist.adaptive/net.0.weight"] < 1.0  # the dead units' zeros
    # the Trainer's own loss entries are still there, one per logging step
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4, 6]
    # the console shows the summary, one short line per logging step, and no per-tensor key
    lines = [line for line in capsys.readouterr().out.splitlines() if "fasthist" in line]
    assert len(lines) == 3 and all("fasthist/eps_low" in line and len(line) < 600 for line in lines)
    assert not any("fasthist." in line for line in lines)


def test_every_n_steps_and_no_reads_in_between(tmp_path):
    trainer, opt = train(tmp_path, HistogramCallback(3, max_tensors=0))
    reads = []
    rows = opt.histogram_rows

    def counted(*a, **k):
        reads.append(trainer.state.global_step)
        return rows(*a, **k)

    opt.histogram_rows = counted
    trainer.train()
    assert reads == [3, 6]  # the histograms are touched on logging steps only
    got = fasthist_entries(trainer)
    assert sorted(got) == [3, 6]
    assert not any("/net." in k for k in got[6])  # max_tensors=0: the summary only
    assert math.isclose(got[6]["fasthist/p98"], expected(opt)["fasthist/p98"], rel_tol=1e-12)


def per_tensor_keys(received, step):
    return {k for s, logs in received if s == step for k in logs if "/net." in k}


def test_cap_and_selection(tmp_path):
    pytest.importorskip("tensorboard")
    with pytest.warns(UserWarning, match="more than max_tensors=3"):
        trainer, _ = train(tmp_path / "a", HistogramCallback(max_tensors=3), max_steps=2, report_to="tensorboard")
        received = record_logger_calls(trainer)
        trainer.train()
    assert not per_tensor_keys(received, 2) and fasthist_entries(trainer)[2]
    callback = HistogramCallback(tensors="*.weight", max_tensors=3)
    trainer, _ = train(tmp_path / "b", callback, max_steps=2, report_to="tensorboard")
    received = record_logger_calls(trainer)
    trainer.train()
    keys = per_tensor_keys(received, 2)
    assert keys == {f"fasthist.{s}/net.{i}.weight" for s in ("p02", "p50", "p98", "adaptive") for i in (0, 2)}


def test_a_frozen_tensor_is_logged_once_it_has_counts_and_a_wrong_name_fails_at_train_start(tmp_path):
    pytest.importorskip("tensorboard")
    model = Tiny()
    model.net[2].bias.requires_grad_(False)  # in the optimizer, never stepped: no histogram
    callback = HistogramCallback(tensors=["net.2.bias", "net.0.weight"])
    trainer, opt = train(tmp_path / "a", callback, model=model, max_steps=4, report_to="tensorboard")
    received = record_logger_calls(trainer)
    trainer.train()  # used to raise at the first logging step: net.2.bias "matches no tracked tensor"
    assert "net.2.bias" not in opt.histograms()
    assert per_tensor_keys(received, 4) == {f"fasthist.{s}/net.0.weight" for s in ("p02", "p50", "p98", "adaptive")}
    trainer, opt = train(tmp_path / "b", HistogramCallback(tensors=["net.9.bias"]))
    with pytest.raises(ValueError, match="Invalid tensors: 'net.9.bias' matches no tracked tensor"):
        trainer.train()
    assert not opt.state  # before the first step


def test_an_unattached_callback_is_refused_before_the_first_step(tmp_path):
    trainer, opt = train(tmp_path / "a", lambda t: t.add_callback(HistogramCallback()))
    with pytest.raises(RuntimeError, match="is not attached to a Trainer; call callback.attach"):
        trainer.train()
    other, _ = train(tmp_path / "b", None)
    trainer, opt = train(tmp_path / "c", lambda t: t.add_callback(HistogramCallback(trainer=other)))
    with pytest.raises(RuntimeError, match="attached to a Trainer that does not hold it"):
        trainer.train()
    assert not opt.state
    trainer, opt = train(tmp_path / "d", lambda t: t.add_callback(HistogramCallback(trainer=t)), max_steps=2)
    trainer.train()  # trainer= and add_callback: as attach() does
    assert fasthist_entries(trainer)[2]["fasthist/p98"] == expected(opt)["fasthist/p98"]


def test_tensorboard_receives_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, opt = train(tmp_path, HistogramCallback(histograms=True), report_to="tensorboard")
    want = record_expected(opt)
    trainer.train()
    (events_file,) = tmp_path.rglob("events.out.tfevents.*")
    ea = EventAccumulator(str(events_file.parent), size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    for key in ("fasthist/eps_low_raw", "fasthist.p50/net.2.weight", "fasthist.adaptive/net.0.weight"):
        events = ea.Scalars(f"train/{key}")  # HF's TensorBoardCallback prefixes train/
        assert [e.step for e in events] == [2, 4, 6]
        for e in events:
            assert math.isclose(e.value, want[e.step][key], rel_tol=1e-6)  # float32 in the event file
    hist = ea.Histograms("fasthist/net.0.weight")
    assert [h.step for h in hist] == [2, 4, 6]
    assert hist[-1].histogram_value.num == opt.histograms()["net.0.weight"].count
    assert hist[-1].histogram_value.bucket[0] == opt.histograms()["net.0.weight"].zero_count


def test_wandb_receives_scalars_and_histograms(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer, opt = train(tmp_path, HistogramCallback(histograms=True), report_to="wandb", max_steps=4)
    want = record_expected(opt)
    trainer.train()
    import wandb

    wandb.finish()
    entries = wandb_history(tmp_path)
    scalars = [e for e in entries if "train/fasthist/p50" in e]  # HF's WandbCallback prefixes train/
    assert [e["train/global_step"] for e in scalars] == [2, 4]
    for e in scalars:
        assert e["train/fasthist/p50"] == want[e["train/global_step"]]["fasthist/p50"]
    hists = [e for e in entries if "fasthist/net.0.weight/values" in e]
    assert [e["train/global_step"] for e in hists] == [2, 4]
    assert sum(hists[-1]["fasthist/net.0.weight/values"]) == opt.histograms()["net.0.weight"].count


def test_a_non_fasthist_optimizer_is_refused_before_the_first_step(tmp_path):
    def plain(model):
        return torch.optim.Adam(model.parameters())

    trainer, opt = train(tmp_path, HistogramCallback(), opt=plain)
    with pytest.raises(TypeError, match="needs a fasthist optimizer.*AcceleratedOptimizer -> Adam"):
        trainer.train()
    assert not opt.state  # no step was taken


def test_bad_options():
    with pytest.raises(ValueError, match="Invalid every_n_steps: 0"):
        HistogramCallback(0)
    with pytest.raises(ValueError, match="Invalid max_tensors: -1"):
        HistogramCallback(max_tensors=-1)
    with pytest.raises(ValueError, match=r"Invalid max_tensors: True; expected an int >= 0 or None"):
        HistogramCallback(max_tensors=True)  # a bool is no count
    with pytest.raises(ValueError, match="Invalid every_n_steps: True"):
        HistogramCallback(True)
    with pytest.raises(ValueError, match="Invalid window: 'epoch'"):
        HistogramCallback(window="epoch")


def test_unwraps_to_the_fasthist_optimizer(tmp_path):
    trainer, opt = train(tmp_path, HistogramCallback(), max_steps=2)
    trainer.train()
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert fasthist.unwrap(trainer.optimizer) is opt


def test_one_callback_in_two_trainers(tmp_path):
    callback = HistogramCallback()
    for run in ("a", "b"):  # the second Trainer starts at step 0 again, and is the one logged to
        trainer, opt = train(tmp_path / run, callback, max_steps=2)
        trainer.train()
        assert callback.trainer is trainer
        assert sum(cb is callback for cb in trainer.callback_handler.callbacks) == 1
        assert fasthist_entries(trainer)[2]["fasthist/p98"] == expected(opt)["fasthist/p98"]


class Spiky(Tiny):
    """``Tiny`` whose loss is scaled by 1e3 from its ``spike_at``-th forward pass on: the
    gradients jump far past what Adam's second moment expects."""

    def __init__(self, spike_at: int) -> None:
        super().__init__()
        self.spike_at, self.calls = spike_at, 0

    def forward(self, x, labels=None):
        self.calls += 1
        out = super().forward(x, labels)
        if self.calls >= self.spike_at:
            out["loss"] = out["loss"] * 1e3
        return out


def test_staleness_to_tensorboard_and_the_alert(tmp_path):
    """With staleness tracked: the RMS staleness and p99 (summary and per tensor) reach
    TensorBoard as the optimizer's own queries give them, the staleness histograms too,
    and the alert fires once, at the step the gradients jump."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)  # the model's initialisation: the run is deterministic
    alert = fasthist.health.StalenessAlert(window=4, ratio=1.5, cooldown=20)
    callback = HistogramCallback(1, histograms=True, alert=alert)
    trainer, opt = train(
        tmp_path, callback, opt=staleness_optimizer, model=Spiky(spike_at=9), max_steps=12, report_to="tensorboard"
    )
    want = record_expected(opt, expected_staleness)
    with pytest.warns(RuntimeWarning, match="at step 9 the gradients jumped"):
        trainer.train()
    assert [e.start for e in callback.alert.episodes] == [9]
    (events_file,) = tmp_path.rglob("events.out.tfevents.*")
    ea = EventAccumulator(str(events_file.parent), size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    keys = ("fasthist/staleness_p99", "fasthist/staleness_rms_median", "fasthist/staleness_rms_max")
    for key in (*keys, "fasthist.staleness_rms/net.0.weight", "fasthist.staleness_p99/net.2.bias"):
        events = ea.Scalars(f"train/{key}")
        assert [e.step for e in events] == list(range(1, 13))
        for e in events:
            assert math.isclose(e.value, want[e.step][key], rel_tol=1e-6)  # float32 in the event file
    assert [e.value for e in ea.Scalars("train/fasthist/staleness_alert")] == [0.0] * 8 + [1.0] * 4
    hist = ea.Histograms("fasthist.staleness/net.0.weight")
    assert [h.step for h in hist] == list(range(1, 13))
    assert hist[-1].histogram_value.num == opt.histograms(quantity="staleness")["net.0.weight"].count


def test_alert_needs_staleness(tmp_path):
    trainer, _ = train(tmp_path, HistogramCallback(alert=True), max_steps=2)
    with pytest.raises(ValueError, match="alert needs the optimizer to track staleness"):
        trainer.train()
    with pytest.raises(ValueError, match="Invalid alert"):
        HistogramCallback(alert="yes")
