"""The ``fasthist`` command end to end on small --steps budgets, in-process (fast) and
through ``python -m fasthist`` (exit codes, one-line errors, never a traceback)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from fasthist.cli import main

pytest.importorskip("sklearn")  # the digits task and the figures come with the [demo] extra
pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own exits
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


@pytest.mark.parametrize("task", ["digits", "charlm", "gpt"])
def test_eps_range(task, tmp_path, capsys):
    figures = [] if task == "digits" else ["--no-figures"]  # figures take seconds: draw them once
    rc, out, err = run(
        ["eps-range", "--task", task, "--steps", "3", "--quiet", *figures, "--out", str(tmp_path)], capsys
    )
    assert rc == 0, err
    assert "estimated ε range" in out and "candidate decades" in out
    data = json.loads((tmp_path / "eps_range.json").read_text())
    assert data["command"] == "eps-range" and data["task"] == task and data["batches"] == 3
    rng = data["eps_range"]
    assert {"low", "high", "low_raw", "high_raw", "candidates", "rows", "ambiguous", "relative_accuracy"} <= set(rng)
    assert rng["low"] <= rng["high"] and rng["candidates"][0] == rng["low"] and rng["candidates"][-1] == rng["high"]
    assert rng["low_raw"] <= rng["high_raw"]
    for t in data["tensors"]:
        assert {"name", "numel", "nonzero", "zero_share", "p02", "p50", "p98", "adaptive_share"} <= set(t)
        if t["nonzero"]:
            assert t["p02"] <= t["p50"] <= t["p98"]
        assert 0.0 <= t["adaptive_share"] <= 1.0 and 0.0 <= t["zero_share"] <= 1.0
        assert t["name"] in out
    assert set(data["grid_inside"]) <= set(data["conventional_grid"])
    if task == "charlm":  # byte values that never occur: zero rows of the embedding
        emb = next(t for t in data["tensors"] if t["name"] == "embed.weight")
        assert emb["zero_share"] > 0.3
    if figures:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["eps_range.json"]
    else:
        assert is_png(tmp_path / "histograms.png") and is_png(tmp_path / "adaptability.png")


def test_eps_range_deterministic(tmp_path, capsys):
    results = []
    for i in range(2):
        out = tmp_path / str(i)
        assert (
            run(["eps-range", "--steps", "4", "--seed", "3", "--quiet", "--no-figures", "--out", str(out)], capsys)[0]
            == 0
        )
        data = json.loads((out / "eps_range.json").read_text())
        results.append((data["eps_range"], data["tensors"]))
    assert results[0] == results[1]


def test_eps_range_adamw_options(tmp_path, capsys):
    argv = ["eps-range", "--optimizer", "adamw", "--weight-decay", "0.01", "--clip-grad-norm", "1.0"]
    rc, out, err = run([*argv, "--steps", "2", "--quiet", "--no-figures", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "eps_range.json").read_text())
    assert data["optimizer"] == "adamw" and data["clip_grad_norm"] == 1.0


def test_sweep(tmp_path, capsys):
    argv = ["sweep", "--eps", "1e-8,1e-3", "--epochs", "1", "--steps", "6", "--seeds", "2", "--quiet"]
    rc, out, err = run([*argv, "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    assert "best ε" in out and "saved" in out and "narrower" in out
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["grid"] == [1e-8, 1e-3] and data["seeds"] == [0, 1] and data["steps_per_run"] == 6
    assert [r["eps"] for r in data["runs"]] == [1e-8, 1e-3]
    for r in data["runs"]:
        assert len(r["metrics"]) == 2 and r["metric_min"] <= r["metric"] <= r["metric_max"]
        assert 0.0 <= r["metric"] <= 100.0
        assert r["in_range"] == (r["eps"] in data["grid_inside"])
    assert data["best_eps"] in data["grid"]
    assert data["best_inside"] == (data["best_eps"] in data["grid_inside"])
    assert data["saved"] == len(data["grid"]) - len(data["grid_inside"])
    assert data["narrowing"] == len(data["grid"]) / len(data["eps_range"]["candidates"])
    assert is_png(tmp_path / "sweep.png") and is_png(tmp_path / "quantiles.png")
    assert data["verdict"].startswith("best ε") and data["verdict"] in out.splitlines()  # one wording


def test_sweep_charlm_metric_is_perplexity(tmp_path, capsys):
    argv = ["sweep", "--task", "charlm", "--eps", "1e-6", "--steps", "3", "--seeds", "1", "--quiet", "--no-figures"]
    rc, out, err = run([*argv, "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["metric"] == "perplexity" and not data["higher_is_better"]
    assert 1.0 < data["runs"][0]["metric"] < 300.0


def test_bench(capsys):
    rc, out, err = run(["bench", "--params", "20000", "--steps", "2", "--quiet"], capsys)
    assert rc == 0, err
    for name in ("torch.optim.Adam", "fasthist.Adam", "fasthist.Adam (track=False)", "opt.eps_range()"):
        assert name in out
    ratios = [float(line.split()[-3]) for line in out.splitlines() if line.startswith("fasthist.Adam")]
    assert len(ratios) == 4 and all(math.isfinite(r) and r > 0 for r in ratios)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eps-range", "--task", "mnist"], "invalid choice: 'mnist'"),
        (["sweep", "--task", "imagenet"], "invalid choice: 'imagenet'"),
        (["sweep", "--eps", "1e-8,abc"], "'abc' is not a number"),
        (["sweep", "--eps", ","], "invalid ε list"),
        (["sweep", "--eps", "1e-8,-1"], "not a positive finite number"),
        (["sweep", "--epochs", "0"], "invalid positive integer"),
        (["eps-range", "--steps", "x"], "invalid positive integer"),
        (["eps-range", "--optimizer", "sgd"], "invalid choice: 'sgd'"),
        (["bench", "--params", "-5"], "invalid positive integer"),
        (["eps-range", "--threads", "0"], "invalid positive integer"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments(argv, needle, capsys):
    rc, out, err = run(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
@pytest.mark.parametrize("cmd", [["eps-range"], ["sweep"], ["bench"]])
def test_cuda_without_gpu(cmd, tmp_path, capsys):
    rc, out, err = run(
        [*cmd, "--device", "cuda", "--out", str(tmp_path)] if cmd != ["bench"] else [*cmd, "--device", "cuda"], capsys
    )
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]


def test_runtime_failure_is_one_line(tmp_path, capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr("fasthist.estimate.eps_pass", fails)
    rc, out, err = run(["eps-range", "--steps", "1", "--quiet", "--out", str(tmp_path)], capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fasthist eps-range: error: disk on fire") and "Traceback" not in err


def test_python_dash_m():
    bad = subprocess.run(
        [sys.executable, "-m", "fasthist", "sweep", "--eps", "1e-8,oops"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "'oops' is not a number" in lines[0]


def test_eps_range_gpt_flags_the_key_biases_and_states_both_ranges(tmp_path, capsys):
    rc, out, err = run(["eps-range", "--task", "gpt", "--steps", "4", "--quiet", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "eps_range.json").read_text())
    rng = data["eps_range"]
    assert sorted(rng["dead"]) == ["blocks.0.qkv.bias", "blocks.1.qkv.bias"]
    for t in data["tensors"]:
        if t["name"].endswith("qkv.bias"):
            assert t["dead"] == 32 and abs(t["dead_share"] - 1 / 3) < 1e-9  # the key third
    assert rng["low_tensor"].endswith("qkv.bias") and rng["low"] <= 1e-10
    assert rng["without_dead"]["low"] >= 1e-6 and not rng["without_dead"]["low_tensor"].endswith("qkv.bias")
    assert "numerically dead" in out and "without the numerically dead values" in out
    assert is_png(tmp_path / "histograms.png")
    rc, out, err = run(
        [
            "eps-range",
            "--task",
            "gpt",
            "--steps",
            "4",
            "--quiet",
            "--no-figures",
            "--drop-dead",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert rc == 0, err
    dropped = json.loads((tmp_path / "eps_range.json").read_text())["eps_range"]
    assert (dropped["low"], dropped["high"]) == (rng["without_dead"]["low"], rng["without_dead"]["high"])
    assert "the paper's rule over every tensor" in out


def test_eps_range_exclude(tmp_path, capsys):
    argv = ["eps-range", "--steps", "2", "--quiet", "--no-figures", "--out", str(tmp_path)]
    rc, out, err = run([*argv, "--exclude", "8.*", "--exclude", "0.bias"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "eps_range.json").read_text())
    assert data["exclude"] == ["8.*", "0.bias"]
    assert data["eps_range"]["excluded"] == ["0.bias", "8.weight", "8.bias"]
    assert "(excluded)" in out
    rc, out, err = run([*argv, "--exclude", "nope.*"], capsys)
    assert rc == 2 and "matches no tensor" in err and len(err.strip().splitlines()) == 1


def test_eps_range_table_reads_the_metrics_the_integrations_log():
    # one "share above ε" and one median for the table, the callbacks and the figures: the
    # table's rows are the integrations' per-tensor metrics at the table's ε, and both equal
    # each tensor's Histogram queries (exact: the same counts, the same rule)
    from fasthist.cli.eps_range import ADAPTIVE_SHARE_EPS, tensor_rows
    from fasthist.estimate import eps_pass
    from fasthist.integrations.metrics import snapshot, tensor_scalars

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    batches = [torch.randn(8, 6) for _ in range(3)]
    opt = eps_pass(model, batches, lambda m, b: m(b).square().mean(), progress=False)
    rows = tensor_rows(opt, opt.eps_range(), ADAPTIVE_SHARE_EPS)
    logged = tensor_scalars(snapshot(opt, eps=ADAPTIVE_SHARE_EPS))
    hists = opt.histograms()
    for r in rows:
        h = hists[r["name"]]
        assert r["p50"] == logged[r["name"]]["p50"] == h.quantile(0.5, exclude_zeros=True)
        assert r["adaptive_share"] == logged[r["name"]]["adaptive"] == h.fraction_above(ADAPTIVE_SHARE_EPS)
