"""The report of ``gpu_report.py`` from its measured rows: each row's baseline, the ratios,
the printed table, the speed targets, and the JSON file (written, and read back from this
or an older version of the script).

A row is ``{"set", "dtype", "optimizer", "provider", "ms", "gbps"[, "call"]}``; rows are
compared within a group (:func:`group_of`: the optimizer, plus ``+scaler`` for the
GradScaler rows), set and dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from harness import DTYPES, GPU_SETS

from fasthist.catalog import declarations

__all__ = [
    "BASELINES",
    "assign_baselines",
    "group_of",
    "ratios",
    "read_report",
    "report_json",
    "table",
    "targets",
]

#: The baseline of a row group's ratio column: the first of these measured in the group
#: (torch's fused step, else its foreach one, else the optimizer's published package, else
#: torch's fused Adam as a stand-in); the GradScaler rows' with ``+scaler``.
BASELINES = ("torch_fused", "torch_foreach", "adabelief_pytorch", "torch_adam_fused")
#: Row groups in display order: each declared optimizer, then its GradScaler rows.
GROUP_ORDER = tuple(g for name in declarations() for g in (name, f"{name}+scaler"))
#: Keys of the JSON's ``steps`` written by older versions of the script, and their names now.
OLD_STEP_KEYS = {"issue5": "candidates"}


def group_of(row: dict) -> str:
    """The row group a row's baseline is chosen in (:data:`BASELINES`)."""
    return row["optimizer"] + ("+scaler" if row["provider"].endswith("+scaler") else "")


def assign_baselines(rows: list[dict]) -> None:
    """Sets each row's ``baseline``: the first of :data:`BASELINES` measured in its group,
    set and dtype (None if none was)."""
    present: dict[tuple, set[str]] = {}
    for r in rows:
        present.setdefault((group_of(r), r["set"], r["dtype"]), set()).add(r["provider"])
    for r in rows:
        have = present[(group_of(r), r["set"], r["dtype"])]
        suffix = "+scaler" if group_of(r).endswith("+scaler") else ""
        r["baseline"] = next((b + suffix for b in BASELINES if b + suffix in have), None)


def ratios(rows: list[dict]) -> dict[tuple[str, str, str, str], float]:
    """``ms / ms(baseline)`` per (optimizer, set, dtype, provider) of the same run."""
    ms = {(group_of(r), r["set"], r["dtype"], r["provider"]): r["ms"] for r in rows}
    out = {}
    for r in rows:
        base = ms.get((group_of(r), r["set"], r["dtype"], r.get("baseline")))
        if base:
            out[(r["optimizer"], r["set"], r["dtype"], r["provider"])] = r["ms"] / base
    return out


def display_order(rows: list[dict]) -> list[dict]:
    dorder = list(DTYPES)
    return sorted(
        rows, key=lambda r: (GROUP_ORDER.index(group_of(r)), GPU_SETS.index(r["set"]), dorder.index(r["dtype"]))
    )


def table(rows: list[dict], copy_gbps: float) -> str:
    """ms/step, GB/s, % of the copy bandwidth and the ratio to the baseline, per row."""
    rat = ratios(rows)
    lines = [
        f"{'set':<4}{'dtype':<6}{'optimizer':<11}{'provider':<23}{'ms/step':>10}{'GB/s':>9}{'% copy':>8}"
        f"{'x base':>8}  baseline",
        "-" * 100,
    ]
    prev = None
    for r in display_order(rows):
        if prev is not None and group_of(r) != prev:
            lines.append("")
        prev = group_of(r)
        x = rat.get((r["optimizer"], r["set"], r["dtype"], r["provider"]))
        lines.append(
            f"{r['set']:<4}{r['dtype']:<6}{r['optimizer']:<11}{r['provider']:<23}{r['ms']:>10.3f}{r['gbps']:>9.1f}"
            f"{100 * r['gbps'] / copy_gbps:>7.1f}%{(f'{x:.3f}' if x is not None else '-'):>8}  {r.get('baseline') or '-'}"
        )
    return "\n".join(lines)


def targets(rows: list[dict], copy_gbps: float) -> list[tuple[str, str, bool | None]]:
    """The speed targets of the Adam rows (without a scaler): (target, measured figure, met)."""
    adam = [r for r in rows if group_of(r) == "adam"]
    by = {(r["set"], r["dtype"], r["provider"]): r for r in adam}
    rat = {k[1:]: v for k, v in ratios(adam).items()}
    out: list[tuple[str, str, bool | None]] = []
    for s in GPU_SETS:
        for d in DTYPES:
            key = (s, d, "fasthist_track")
            if key in rat:
                out.append((f"fasthist_track <= 1.03x torch_fused, set {s} {d}", f"{rat[key]:.3f}x", rat[key] <= 1.03))
            hist = by.get((s, d, "torch_fused+hist"))
            if key in by and hist is not None:
                speedup = hist["ms"] / by[key]["ms"]
                target = f"fasthist_track >= 2x faster than torch_fused+hist, set {s} {d}"
                out.append((target, f"{speedup:.2f}x", speedup >= 2.0))
    a = by.get(("a", "fp32", "fasthist_track"))
    if a is not None:
        pct = a["gbps"] / copy_gbps
        out.append(("fasthist_track >= 85% of copy bandwidth, set a fp32", f"{100 * pct:.1f}%", pct >= 0.85))
    for d in DTYPES:
        key = ("c", d, "fasthist_track")
        if key in rat:
            out.append((f"fasthist_track within 1.10x torch_fused, set c {d}", f"{rat[key]:.3f}x", rat[key] <= 1.10))
    return out


def report_json(
    rows: list[dict],
    copy_gbps: float,
    gpu: str,
    date: str,
    skipped: list[dict] | None = None,
    extra: dict | None = None,
) -> dict:
    """``{"date", "gpu", "torch", "triton", "copy_gbps", "rows", "skipped", **extra}``."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out = {
        "date": date,
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "copy_gbps": round(copy_gbps, 1),
        "rows": [
            {
                "set": r["set"],
                "dtype": r["dtype"],
                "optimizer": r.get("optimizer", "adam"),
                "provider": r["provider"],
                "ms": round(r["ms"], 4),
                "gbps": round(r["gbps"], 1),
                "baseline": r.get("baseline"),
                **({"call": r["call"]} if "call" in r else {}),
            }
            for r in rows
        ],
        "skipped": list(skipped or []),
    }
    out.update(extra or {})
    return out


def read_report(path: str | Path) -> dict:
    """A report JSON in today's format, also when an older version of the script wrote it:
    rows without ``optimizer`` are Adam rows (and without ``baseline``, get it assigned),
    ``skipped`` defaults to empty, and the old ``steps`` keys get their names of today
    (:data:`OLD_STEP_KEYS`)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = [{"optimizer": "adam", **r} for r in data.get("rows", [])]
    if any("baseline" not in r for r in rows):
        assign_baselines(rows)
    data["rows"] = rows
    data.setdefault("skipped", [])
    if isinstance(data.get("steps"), dict):
        data["steps"] = {OLD_STEP_KEYS.get(k, k): v for k, v in data["steps"].items()}
    return data
