"""The fused kernels' static cost targets, on the installed Triton, without a GPU.

``bench/sass_report.py`` compiles every kernel for sm_90 and reads the SASS; this test holds
each (optimizer, dtype) to the targets: the histogram strategy the runtime would pick is the
shared-memory one, hot loop <= 1.25x the untracked kernel's, whole kernel <= 1.30x, no spills,
<= 128 registers. The committed reports for Triton 3.6, 3.7, 3.8 and 3.9 are in
``bench/results/sass-triton-*.json``.

A known miss, if one is ever accepted, is marked strict xfail with its reason (it must
fail; if it starts passing, the mark goes). None at present: AdaBelief, whose histogram of
``(1 - beta2) * s_hat`` once cost an IEEE division per element, now multiplies by the
host-rounded reciprocal on every backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError as e:
    pytest.skip(f"no NVIDIA backend in this Triton: {e}", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
KNOWN_MISSES: dict[tuple[str, str], str] = {}  # (kernel, dtype): why; none at present
ROWS = [
    (k, d)
    for k in ("adam", "adamw", "rmsprop", "adagrad", "adabelief")
    for d in ("float32", "bfloat16", "float16")
    if (k, d) != ("adabelief", "float16")  # no kernel: the reference backend runs it
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "bench" / "sass_report.py"), "--arch", "90", "--no-fallback", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["archs"]["sm_90"]
    return {(r["kernel"], r["dtype"]): r for r in rows}


@pytest.mark.parametrize(
    ("kernel", "dtype"),
    [
        pytest.param(k, d, marks=pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[(k, d)]))
        if (k, d) in KNOWN_MISSES
        else (k, d)
        for k, d in ROWS
    ],
)
def test_static_cost_targets(report, kernel, dtype):
    row = report[(kernel, dtype)]
    assert row["strategy"] == "shared", row["guard_problems"]
    tracked = row["tracked"]
    assert tracked["shared_atomics"] > 0.99, "every element counted with one shared atomic"
    assert row["misses"] == [], row["misses"]
    # the figures behind the verdict, spelled out
    assert row["hot_ratio"] <= 1.25 and row["whole_ratio"] <= 1.30
    assert tracked["registers"] <= 128 and tracked["stack_bytes"] == 0 and tracked["local_ops"] == 0
