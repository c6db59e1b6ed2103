"""HistogramCallback in a real Lightning Trainer on the CPU: what reaches the CSVLogger's
metrics.csv and TensorBoard's event files, against the optimizer's own queries at each
logging step."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import fasthist
from fasthist.catalog import declarations
from tests._integration_helpers import Tiny, data, expected_staleness, optimizer, record_expected, staleness_optimizer

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from fasthist.integrations.lightning import HistogramCallback  # noqa: E402


class Module(L.LightningModule):
    def __init__(self, make_opt=optimizer):
        super().__init__()
        self.tiny = Tiny()
        self.make_opt = make_opt
        self.opt = None

    def training_step(self, batch, batch_idx):
        loss = self.tiny(*batch)["loss"]
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        self.opt = self.make_opt(self.tiny)
        if isinstance(self.opt, fasthist.Adam):  # what the callback should log, after each step
            self.seen = record_expected(self.opt)
        return self.opt


def fit(tmp_path, callback, loggers, module=None, **kwargs):
    module = module or Module()
    trainer = L.Trainer(
        max_steps=kwargs.pop("max_steps", 6), log_every_n_steps=2, accelerator="cpu", logger=loggers,
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        **kwargs,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=8))
    return trainer, module


def rows(logger):
    with open(f"{logger.log_dir}/metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_csv_matches_the_optimizer(tmp_path):
    logger = CSVLogger(str(tmp_path))
    trainer, module = fit(tmp_path, HistogramCallback(), logger)
    got = {int(r["step"]): r for r in rows(logger) if r.get("fasthist/p50")}
    loss_steps = [int(r["step"]) for r in rows(logger) if r.get("loss")]
    assert sorted(got) == loss_steps == [1, 3, 5]  # beside Lightning's own rows for the same batches
    for step, row in got.items():
        ref = module.seen[step + 1]  # after optimizer step global_step = step + 1
        for k, v in ref.items():
            assert math.isclose(float(row[k]), v, rel_tol=1e-12), (step, k, row[k], v)
        assert float(row["fasthist.adaptive/net.0.weight"]) < 1.0  # the dead units' zeros


def test_gradient_accumulation_and_every_n_steps(tmp_path):
    logger = CSVLogger(str(tmp_path))
    trainer, module = fit(tmp_path, HistogramCallback(3), logger, accumulate_grad_batches=2)
    assert trainer.global_step == 6
    got = {int(r["step"]): r for r in rows(logger) if r.get("fasthist/p50")}
    assert sorted(got) == [2, 5]  # optimizer steps 3 and 6, once each although two batches end there
    for step, row in got.items():
        assert math.isclose(float(row["fasthist/p98"]), module.seen[step + 1]["fasthist/p98"], rel_tol=1e-12)


def test_tensorboard_logger_gets_scalars_and_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path))
    trainer, module = fit(tmp_path, HistogramCallback(histograms=True), logger)
    ea = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    events = ea.Scalars("fasthist.p02/net.2.weight")
    assert [e.step for e in events] == [1, 3, 5]
    for e in events:
        assert math.isclose(e.value, module.seen[e.step + 1]["fasthist.p02/net.2.weight"], rel_tol=1e-6)
    hist = ea.Histograms("fasthist/net.0.weight")
    assert [h.step for h in hist] == [1, 3, 5]
    assert hist[-1].histogram_value.num == module.opt.histograms()["net.0.weight"].count


def test_a_non_fasthist_optimizer_is_refused_before_the_first_step(tmp_path):
    module = Module(lambda m: torch.optim.Adam(m.parameters()))
    with pytest.raises(TypeError, match="needs a fasthist optimizer.*got Adam") as info:
        fit(tmp_path, HistogramCallback(), CSVLogger(str(tmp_path)), module=module)
    assert not module.opt.state
    # the optimizers it names are the declared ones (a new declaration shows up there)
    assert f"(declared: {', '.join(declarations())})" in str(info.value)


def test_bad_options():
    with pytest.raises(ValueError, match="Invalid optimizer_index: True; expected an int >= 0"):
        HistogramCallback(optimizer_index=True)  # a bool is no index
    with pytest.raises(ValueError, match="Invalid max_tensors: False"):
        HistogramCallback(max_tensors=False)


def test_csv_gets_staleness(tmp_path):
    """With staleness tracked, the RMS staleness and p99 reach the CSV as the optimizer's
    own queries give them; an alert is fed every logging step."""
    module = Module(staleness_optimizer)
    module.configure_optimizers = lambda: _recording(module)
    logger = CSVLogger(str(tmp_path))
    callback = HistogramCallback(alert=fasthist.health.StalenessAlert(window=50))
    trainer, module = fit(tmp_path, callback, logger, module=module)
    got = {int(r["step"]): r for r in rows(logger) if r.get("fasthist/staleness_p99")}
    assert sorted(got) == [1, 3, 5]
    for step, row in got.items():
        for k, v in module.seen[step + 1].items():
            assert math.isclose(float(row[k]), v, rel_tol=1e-12), (step, k, row[k], v)
        assert float(row["fasthist/staleness_alert"]) == 0.0  # fed, within its first window
    assert len(callback.alert._history) == 3


def _recording(module):
    module.opt = staleness_optimizer(module.tiny)
    module.seen = record_expected(module.opt, expected_staleness)
    return module.opt
