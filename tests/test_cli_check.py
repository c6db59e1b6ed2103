"""``fasthist check``: versions, device, and per optimizer and dtype what ran and its
self-test; exit 0 when the self-tests agree, 1 when one differs, 2 on a bad argument. On a
CPU-only machine the kernels run under Triton's interpreter (a small selection here: each
self-test costs seconds there)."""

from __future__ import annotations

import json

import pytest
import torch
from _kernel_helpers import DEVICE  # before triton

pytest.importorskip("triton")

from fasthist import backend, selftest  # noqa: E402
from fasthist.adam import ADAM  # noqa: E402
from fasthist.cli.app import main  # noqa: E402

if backend.kernels_module(interpret=DEVICE.type == "cpu") is None:
    pytest.skip("fasthist.kernels not importable in this process", allow_module_level=True)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(selftest, "_VERDICTS", {})
    monkeypatch.delenv("FASTHIST_SELFTEST", raising=False)


ARGS = ["check", "--device", DEVICE.type, "--optimizers", "adam", "--dtypes", "float32", "--no-bench"]


@pytest.mark.interpreter
def test_agrees(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main([*ARGS, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "Triton " in text and "device: " in text
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["torch"] == torch.__version__
    (row,) = report["rows"]
    assert (row["optimizer"], row["dtype"], row["backend"], row["reason"]) == ("adam", "float32", "triton", "")
    assert row["selftest"]["ok"] is True and row["selftest"]["edges"][0] > 0
    assert "agreed (" in text


@pytest.mark.interpreter
def test_mismatch_exits_1(tmp_path, monkeypatch, capsys):
    real = backend.kernel_function(ADAM)

    def miscount(*lists, hist=None, **kwargs):
        real(*lists, hist=hist, **kwargs)
        hist.step[0, 7] += 1

    monkeypatch.setattr(backend, "kernel_function", lambda decl: miscount if decl is ADAM else real)
    out = tmp_path / "check.json"
    assert main([*ARGS, "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "fasthist check: 1 of 1 self-tests differed from the reference"
    assert "DIFFERED: step histogram: 1 bins differ (tensor 0 bin 7: " in captured.out
    (row,) = json.loads(out.read_text())["rows"]
    assert row["backend"] != "triton" and "self-test" in row["reason"] and row["selftest"]["ok"] is False


def test_bad_dtype_is_a_one_line_error(capsys):
    assert main(["check", "--dtypes", "float64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fasthist check: error: --dtypes 'float64': expected names from float32, bfloat16, float16, complex64"
    ]


def test_overhead_benchmark(tmp_path, capsys):
    """The overhead lines: the tracked step against torch's fused and fasthist's untracked
    one, measured with the backend a user gets; in the JSON too."""
    out = tmp_path / "check.json"
    args = [*ARGS[:-1], "--bench-params", "20000", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "x torch's fused step" in text and "x untracked" in text
    bench = json.loads(out.read_text())["overhead"]
    assert bench["params"] >= 20000 and set(bench["ms"]) == {"torch fused", "untracked", "tracked"}
    assert all(v > 0 for v in bench["ms"].values())
    assert bench["tracked_vs_torch_fused"] == pytest.approx(bench["ms"]["tracked"] / bench["ms"]["torch fused"])
    assert ("copy_bytes_per_s" in bench) == (DEVICE.type == "cuda")
