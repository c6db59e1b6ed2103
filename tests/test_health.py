"""Staleness helpers against exact computations: the bound of Adam's staleness, and the RMS
read off a LogBins histogram against the RMS of the elements."""

from __future__ import annotations

import math

import pytest
import torch

from fasthist import LogBins
from fasthist.health import StalenessAlert, rms_from_counts, staleness_bound

LAYOUTS = [LogBins(), LogBins(-20, 10, 3), LogBins(-126, 128, 7)]


@pytest.mark.parametrize("beta2", [0.9, 0.95, 0.999])
def test_adam_staleness_never_exceeds_the_bound(beta2):
    """torch's Adam state after steps of wild gradients: every |g| / sqrt(v_hat) <= B(β2, t)
    (B from exact arithmetic; the float32 state rounds, hence 1e-5 relative slack)."""
    g = torch.Generator().manual_seed(0)
    p = torch.zeros(10_000, requires_grad=True)
    opt = torch.optim.Adam([p], betas=(0.9, beta2), eps=0.0)
    for t in range(1, 60):
        p.grad = torch.randn(10_000, generator=g) * 10.0 ** torch.randint(-6, 6, (10_000,), generator=g)
        opt.step()
        vhat = opt.state[p]["exp_avg_sq"] / (1 - beta2**t)
        s = p.grad.abs() / vhat.sqrt()
        bound = staleness_bound(beta2, t)
        assert s.max().item() <= bound * (1 + 1e-5), (t, s.max().item(), bound)
    assert s.max().item() > 0.5 * bound, "some element comes close: the bound is tight, not loose"


def test_bound_values_and_errors():
    assert staleness_bound(0.999, 1) == pytest.approx(1.0)
    assert staleness_bound(0.999, 1e9) == pytest.approx(math.sqrt(1000), rel=1e-12)
    assert staleness_bound(0.95, 10_000) == pytest.approx(math.sqrt(20), rel=1e-12)
    assert staleness_bound(0.0, 7) == 1.0
    with pytest.raises(ValueError, match="Invalid beta2"):
        staleness_bound(1.0, 3)
    with pytest.raises(ValueError, match="Invalid step"):
        staleness_bound(0.9, 0)


@pytest.mark.parametrize("bins", LAYOUTS, ids=repr)
def test_rms_from_counts_within_its_stated_error(bins):
    """Rows spanning many decades, with exact zeros: the true RMS (float64, of the float32
    values) lies in [lower, upper], and the estimate is within 2^-(m+1) of it."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for spread in (0, 1, 4, 8):
        x = torch.randn(5000, generator=g, dtype=torch.float64) * 10.0 ** (spread * torch.rand(5000, generator=g))
        x = x.clamp(-bins.high / 2, bins.high / 2).abs().clamp_min(bins.low).to(torch.float32)
        x[:100] = 0.0
        rows.append(x)
    counts = torch.stack([bins.count(x) for x in rows])
    est = rms_from_counts(counts, bins)
    true = torch.stack([x.double().square().mean().sqrt() for x in rows])
    assert torch.all(est.lower <= true) and torch.all(true <= est.upper), (est, true)
    rel = ((est.estimate - true).abs() / true).max().item()
    assert rel < 2.0 ** -(bins.mantissa_bits + 1), rel


def test_rms_from_counts_special_bins():
    bins = LogBins()
    x = torch.tensor([0.0, 0.0, 1.0, 1.0])
    est = rms_from_counts(bins.count(x), bins)
    assert est.lower.item() == pytest.approx(math.sqrt(0.5), rel=1e-12)  # 1.0 is a bin's lower edge
    assert torch.isnan(rms_from_counts(torch.zeros(bins.num_bins, dtype=torch.int64), bins).estimate)
    below = rms_from_counts(bins.count(torch.tensor([bins.low / 4])), bins)
    assert below.lower.item() == 0.0 and below.upper.item() == pytest.approx(bins.low)
    assert rms_from_counts(bins.count(torch.tensor([1.0, bins.high * 2])), bins).upper.item() == math.inf
    assert torch.isnan(rms_from_counts(bins.count(torch.tensor([1.0, math.nan])), bins).estimate)
    with pytest.raises(ValueError, match="Invalid counts"):
        rms_from_counts(torch.zeros(3, dtype=torch.int64), bins)
    with pytest.raises(TypeError, match="integer counts"):
        rms_from_counts(torch.zeros(bins.num_bins), bins)


# -- the alert rule ------------------------------------------------------------------------
def _feed(alert, series):
    return [alert.update(t, [v, v * 0.5, v * 2.0]) for t, v in enumerate(series)]


def test_alert_fires_once_per_episode_and_records_the_step():
    alert = StalenessAlert(ratio=2.0, window=10, cooldown=3, warn=False)
    series = [1.0] * 10 + [1.1, 3.0, 5.0, 4.0, 1.0, 1.0, 1.0, 2.5, 1.0]
    events = _feed(alert, series)
    assert [i for i, e in enumerate(events) if e is not None] == [11, 17]
    first, second = alert.episodes
    assert (first.start, first.end, first.value, first.baseline) == (11, 16, 3.0, 1.0)
    assert first.peak == 5.0 and second.end is None and alert.active


def test_alert_waits_for_its_window_and_freezes_the_baseline():
    alert = StalenessAlert(ratio=2.0, window=5, cooldown=100, warn=False)
    assert all(e is None for e in _feed(alert, [1.0, 100.0, 1.0, 1.0, 1.0]))  # warm-up: never fires
    _feed(alert, [1.0] * 5)
    alert.update(100, [3.0])
    for t in range(101, 140):  # a long episode: the baseline stays what it was before it
        alert.update(t, [3.0])
    assert len(alert.episodes) == 1 and alert.episodes[0].baseline == 1.0 and alert.active


def test_alert_patience_and_nan():
    alert = StalenessAlert(ratio=2.0, window=3, patience=2, warn=False)
    _feed(alert, [1.0, 1.0, 1.0])
    assert alert.update(3, [5.0]) is None and alert.update(4, [1.0]) is None  # one high step: no alert
    assert alert.update(5, [float("nan"), 5.0]) is None  # NaN left out: the median is 5.0
    assert alert.update(6, [5.0]).start == 6
    assert alert.update(7, [float("nan")]) is None


def test_alert_warns_once_with_the_stalest_tensors():
    alert = StalenessAlert(ratio=2.0, window=3)
    for t in range(3):
        alert.update(t, {"a": 1.0, "b": 1.0, "ln.weight": 1.0})
    with pytest.warns(RuntimeWarning, match=r"at step 3 .* stalest: ln.weight, b, a"):
        alert.update(3, {"a": 2.0, "b": 3.0, "ln.weight": 9.0})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alert.update(4, {"a": 2.0, "b": 3.0, "ln.weight": 9.0})  # same episode: silent


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"ratio": 1.0}, "Invalid ratio"), ({"window": 0}, "Invalid window"), ({"patience": True}, "Invalid patience")],
)
def test_alert_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StalenessAlert(**kwargs)


# -- the spike trial -----------------------------------------------------------------------
def test_spike_onsets():
    from fasthist.tasks.spikes import spike_onsets

    loss = [2.0] * 60 + [2.5, 2.6, 2.0] + [2.0] * 10 + [2.5] + [2.0] * 30 + [float("nan")]
    assert spike_onsets(loss) == [60, 104]  # 73 is within 20 steps of the last spike step (61)


def test_evaluate_counts_leads_and_false_alarms():
    from fasthist.tasks.spikes import Trial, evaluate

    trial = Trial("lr10", 0, 0, ["w"])
    trial.loss = [2.0] * 100 + [3.0] * 5 + [2.0] * 95
    trial.rms = [[1.0]] * 97 + [[5.0]] * 3 + [[1.0]] * 60 + [[9.0]] + [[1.0]] * 39
    v = evaluate([trial], lambda t, i: t.rms[i], ratio=2.0, window=50, cooldown=2)
    assert (v.spikes, v.warned, v.leads, v.alerts, v.false_alarms, v.steps) == (1, 1, [3], 2, 1, 200)
    assert v.false_alarms_per_1000_steps == 5.0


def test_staleness_command_end_to_end(tmp_path, capsys):
    """A short trial through the command: the JSON holds every step, the exact and the
    histogram RMS agree within the histogram's stated error."""
    import json

    from fasthist.cli import main

    rc = main(["staleness", "--steps", "56", "--at", "52", "--seeds", "1", "--scenarios", "lr10", "--quiet",
               "--no-figures", "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "gradient norm" in out
    data = json.loads((tmp_path / "staleness.json").read_text())
    (trial,) = data["trials"]
    assert len(trial["loss"]) == len(trial["rms"]) == 56 and len(trial["rms"][0]) == len(trial["names"])
    exact = torch.tensor(trial["rms"], dtype=torch.float64)
    est = torch.tensor(trial["rms_hist"], dtype=torch.float64)
    assert ((est - exact).abs() <= 2.0**-6 * exact).all()
    assert exact[-1].median() > 1.5 * exact[40:52].median(1).values.median()  # the lr jump shows


def test_staleness_command_refuses_bad_input(capsys):
    from fasthist.cli import main

    with pytest.raises(SystemExit) as e:  # argparse's own exit
        main(["staleness", "--task", "digits"])
    assert e.value.code == 2
    assert main(["staleness", "--scenarios", "lr10,bogus"]) == 2
    assert main(["staleness", "--at", "10"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'digits'" in err and "bogus" in err and "--at" in err


def test_staleness_default_task_is_its_own():
    """The trial's default task (gpt) is not every command's: argparse shares a parent
    parser's actions with each child, so a default set on one would change them all."""
    from fasthist.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["staleness"]).task == "gpt"
    assert parser.parse_args(["eps-range"]).task == "digits"
    assert parser.parse_args(["sweep"]).task == "digits"
