"""The report pipeline of ``gpu_report.py`` on the CPU (its timings mean nothing there):
a small ``--dry-run``, the JSON read back, and files written by older versions."""

from __future__ import annotations

import json

import gpu_report
import pytest
from candidates import CANDIDATES
from report import read_report


def test_dry_run_writes_a_readable_report(tmp_path, capsys):
    argv = ["--dry-run", "--sets", "a", "--dtypes", "fp32", "--providers", "torch_fused,fasthist_track"]
    argv += ["--scaler-sets", "a", "--scaler-dtypes", "fp32", "--opt-sets", "a", "--opt-dtypes", "fp32"]
    argv += ["--optimizers", "rmsprop", "--out-dir", str(tmp_path)]
    assert gpu_report.main(argv) == 0
    out = capsys.readouterr().out
    assert "estimated time on an H200" in out and "fasthist_track <= 1.03x torch_fused, set a fp32" in out
    (path,) = tmp_path.glob("dryrun-*.json")
    data = read_report(path)
    assert data["steps"] == {"adam": 3, "candidates": 2}
    got = {(r["optimizer"], r["provider"], r["baseline"]) for r in data["rows"]}
    assert got == {
        ("adam", "torch_fused", "torch_fused"),
        ("adam", "fasthist_track", "torch_fused"),
        ("adam", "torch_fused+scaler", "torch_fused+scaler"),
        ("adam", "fasthist_track+scaler", "torch_fused+scaler"),
        ("rmsprop", "torch_foreach", "torch_foreach"),
        ("rmsprop", "fasthist_notrack", "torch_foreach"),
        ("rmsprop", "fasthist_track", "torch_foreach"),
    }
    assert all(r["ms"] > 0 for r in data["rows"]) and data["skipped"] == []


def test_unknown_name_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_report.main(["--dry-run", "--sets", "z"])
    assert e.value.code == 2 and "unknown set(s) ['z']" in capsys.readouterr().err


def test_old_report_is_read_with_todays_names(tmp_path):
    old = {
        "date": "2026-11-28",
        "gpu": "NVIDIA H200",
        "copy_gbps": 4000.0,
        "rows": [
            {"set": "a", "dtype": "fp32", "provider": "torch_fused", "ms": 2.0, "gbps": 3000.0},
            {"set": "a", "dtype": "fp32", "provider": "fasthist_track", "ms": 2.1, "gbps": 2900.0},
        ],
        "steps": {"adam": 50, "issue5": 30},
    }
    path = tmp_path / "gpu-2026-11-28.json"
    path.write_text(json.dumps(old))
    data = read_report(path)
    assert data["steps"] == {"adam": 50, "candidates": 30} and data["skipped"] == []
    assert [(r["optimizer"], r["baseline"]) for r in data["rows"]] == [("adam", "torch_fused")] * 2


def test_candidate_calls():
    # the "call" of the JSON rows, as earlier reports wrote them
    calls = {c.call for c in CANDIDATES}
    assert "torch.optim.Adam(fused=True) (nearest fused baseline, not AdaBelief)" in calls
    assert "fasthist.Adagrad(foreach=True, track=False)" in calls
    assert "adabelief_pytorch.AdaBelief(print_change_log=False)" in calls
    assert len(calls) == len(CANDIDATES)  # a probe result is remembered by call
