"""GPU report of record for issues 3 and 5: one script, under 5 minutes on one H200.

    python bench/gpu_report.py                 # everything below, with the time estimate
    python bench/gpu_report.py --dry-run       # the whole pipeline on the CPU, tiny sets
    python bench/gpu_report.py --sweep --sets a,c --dtypes fp32   # tune the kernel's launch shape

Measures the device-to-device copy bandwidth, then one ``opt.step()`` of every Adam provider
on the sets of ``providers.gpu_param_shapes`` ((a) 1.1B parameters in 201 tensors, (b) GPT-2
small, (c) 2,000 small tensors totalling 20M), with float32 and bfloat16 parameters (states
in the parameter dtype, as torch keeps them). Each figure is the median of ``--steps``
(default 50) steps after ``--warmup`` steps, timed with CUDA events around ``step()`` alone
(gradients are set once and kept). GB/s counts the bytes a step must move
(``providers.ACCESSES``: 7 accesses per element for Adam, read p, g, m, v; write p, m, v),
the same for every provider of a row group, so it is comparable with the copy bandwidth
(read + write of the copied bytes).

Then the rows of issue 5 (``--extra-steps``, default 30, after ``--extra-warmup`` steps;
each provider is first tried on two small tensors, and one that fails there is reported
as skipped with the error instead of stopping the report):

- ``GradScaler``: ``torch.amp.GradScaler`` drives the step (``scaler.step(opt);
  scaler.update()``, both timed) for ``torch_fused+scaler`` (``torch.optim.Adam(fused=True)``)
  and ``fasthist_track+scaler`` (``fasthist.Adam(fused=True)``: the fused
  ``grad_scale``/``found_inf`` protocol) on ``--scaler-sets`` x ``--scaler-dtypes``
  (default bf16, fp16, fp32 parameters). ``init_scale=1`` so the kept gradients stay as they
  are (the fused step writes the unscaled gradients back); the scaler still checks every
  gradient for inf/NaN and the kernels still divide by the scale tensor. GB/s counts one more
  read of every gradient (the check). torch's CUDA inf/NaN check has no bfloat16 kernel in
  the torch versions we know of (``_amp_foreach_non_finite_check_and_unscale_cuda`` "not
  implemented for 'BFloat16'"): the bf16 rows are then skipped with that reason, and fp16
  (what GradScaler is for) and fp32 (the optimizer side of the usual AMP setup: fp32
  parameters and gradients, fp16 autocast in the forward) carry the comparison.
- the other optimizers against their torch counterparts, fused where torch has one, else
  foreach, on ``--opt-sets`` x ``--opt-dtypes``: ``rmsprop`` (``torch_foreach`` =
  ``torch.optim.RMSprop(foreach=True)``; torch has no fused RMSprop), ``adagrad``
  (``torch_fused`` = ``torch.optim.Adagrad(fused=True)`` where this torch has a CUDA
  kernel for it, and ``torch_foreach``; fasthist with ``fused=True`` where torch accepts it,
  else ``foreach=True``), ``adabelief`` (``adabelief_pytorch`` = the package's AdaBelief,
  only where it imports and on sets of at most 500 tensors, since it steps tensor by tensor
  in Python; and ``torch_adam_fused`` = ``torch.optim.Adam(fused=True)``, not the same
  algorithm but the nearest fused baseline with the same 7 accesses per element), each
  against ``fasthist_notrack`` / ``fasthist_track``.

Every row names its ``baseline`` (the ratio column): ``torch_fused`` for Adam,
``torch_fused+scaler`` for the GradScaler rows, ``torch_foreach`` for RMSprop, Adagrad's
``torch_fused`` (else ``torch_foreach``), AdaBelief's ``adabelief_pytorch`` (else
``torch_adam_fused``). Before measuring, the script prints its estimate of the run's time on
an H200 (a rough bandwidth + host-overhead model); the issue-5 rows are skipped, and
reported so, once the elapsed time plus a row's estimate would pass ``--budget-s``
(default 270 s), so the whole run stays under 5 minutes.

Prints a table (ms/step, GB/s, % of copy bandwidth, ratio to the row's baseline), the
issue's targets with the measured figure, and writes ``bench/results/gpu-<YYYY-MM-DD>.json``::

    {"date", "gpu", "torch", "triton", "copy_gbps",
     "rows": [{"set", "dtype", "optimizer", "provider", "ms", "gbps", "baseline"[, "call"]}],
     "skipped": [{"set", "dtype", "optimizer", "provider", "reason"}],
     "steps": {"adam", "issue5"}, "estimate_s", "elapsed_s"}

(``optimizer`` is "adam" for the rows of issue 3; issue-5 rows add ``call``, the constructor
that was measured. ``--no-extra`` runs the issue-3 rows alone.)

Runs with torch >= 2.6, triton >= 3.2, Python >= 3.10. Exits with status 2 and a message
when there is no CUDA device (and ``--dry-run`` was not given), 3 when fasthist would not
use its Triton kernels on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import io
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def _import_fasthist():
    """fasthist from the install, or straight from this checkout when it is not installed
    (a bare GPU machine): ``kernels/`` is then mapped to ``fasthist.kernels`` by hand, as
    setup.py's ``package_dir`` does."""
    try:
        import fasthist
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import fasthist
    try:
        import fasthist.kernels  # noqa: F401
    except ImportError:
        if (ROOT / "kernels" / "__init__.py").is_file() and str(ROOT) not in fasthist.__path__:
            fasthist.__path__.append(str(ROOT))  # finds ROOT/kernels as fasthist.kernels
    return fasthist


fasthist = _import_fasthist()

from providers import (  # noqa: E402
    ACCESSES,
    TorchFusedPlusHist,
    adabelief_package,
    gpu_param_shapes,
    step_bytes,
)

#: The Adam providers of issue 3 (``optimizer`` "adam", baseline ``torch_fused``).
PROVIDERS: dict[str, Callable[[list[torch.Tensor]], object]] = {
    "torch_foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch_fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "fasthist_notrack": lambda ps: fasthist.Adam(ps, fused=True, track=False),
    "fasthist_track": lambda ps: fasthist.Adam(ps, fused=True, track=True),
    "torch_fused+hist": lambda ps: TorchFusedPlusHist(ps),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SETS = ("a", "b", "c")
MAIN_DTYPES = ("fp32", "bf16")
SCALER_DTYPES = ("bf16", "fp16", "fp32")
OTHER_OPTIMIZERS = ("rmsprop", "adagrad", "adabelief")
#: Per row group, the baseline of the ratio column: the first of these that was measured.
BASELINES = {
    "adam": ("torch_fused",),
    "adam+scaler": ("torch_fused+scaler",),
    "rmsprop": ("torch_foreach",),
    "adagrad": ("torch_fused", "torch_foreach"),
    "adabelief": ("adabelief_pytorch", "torch_adam_fused"),
}
ADABELIEF_PKG_MAX_TENSORS = 500  # the package steps tensor by tensor in Python


@dataclass(frozen=True)
class Candidate:
    """One provider of an issue-5 row: ``factory(params)`` builds the optimizer. Several
    candidates may share a ``provider`` name (e.g. fasthist's Adagrad with ``fused=True``,
    else ``foreach=True``): the first that runs on two small tensors is measured."""

    optimizer: str
    provider: str
    call: str  # the constructor, as the report prints it
    factory: Callable[[list[torch.Tensor]], object] = field(compare=False)
    scaler: bool = False
    max_tensors: int | None = None


def scaler_candidates() -> list[Candidate]:
    return [
        Candidate("adam", "torch_fused+scaler", "torch.optim.Adam(fused=True)", PROVIDERS["torch_fused"], True),
        Candidate(
            "adam", "fasthist_track+scaler", "fasthist.Adam(fused=True, track=True)", PROVIDERS["fasthist_track"], True
        ),
    ]


def _quiet(factory, *args, **kwargs):
    """``factory(*args, **kwargs)`` with its stdout swallowed (adabelief_pytorch prints its
    settings even with ``print_change_log=False``)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return factory(*args, **kwargs)


def other_candidates(optimizers) -> list[Candidate]:
    pkg, _ = adabelief_package()
    out: list[Candidate] = []
    if "rmsprop" in optimizers:
        out += [
            Candidate(
                "rmsprop",
                "torch_foreach",
                "torch.optim.RMSprop(foreach=True)",
                lambda ps: torch.optim.RMSprop(ps, foreach=True),
            ),
            Candidate(
                "rmsprop",
                "fasthist_notrack",
                "fasthist.RMSprop(foreach=True, track=False)",
                lambda ps: fasthist.RMSprop(ps, foreach=True, track=False),
            ),
            Candidate(
                "rmsprop",
                "fasthist_track",
                "fasthist.RMSprop(foreach=True, track=True)",
                lambda ps: fasthist.RMSprop(ps, foreach=True, track=True),
            ),
        ]
    if "adagrad" in optimizers:
        out += [
            Candidate(
                "adagrad",
                "torch_fused",
                "torch.optim.Adagrad(fused=True)",
                lambda ps: torch.optim.Adagrad(ps, fused=True),
            ),
            Candidate(
                "adagrad",
                "torch_foreach",
                "torch.optim.Adagrad(foreach=True)",
                lambda ps: torch.optim.Adagrad(ps, foreach=True),
            ),
        ]
        for track in (False, True):
            name = "fasthist_track" if track else "fasthist_notrack"
            out += [
                Candidate(
                    "adagrad",
                    name,
                    f"fasthist.Adagrad(fused=True, track={track})",
                    lambda ps, t=track: fasthist.Adagrad(ps, fused=True, track=t),
                ),
                Candidate(
                    "adagrad",
                    name,
                    f"fasthist.Adagrad(foreach=True, track={track})",
                    lambda ps, t=track: fasthist.Adagrad(ps, foreach=True, track=t),
                ),
            ]
    if "adabelief" in optimizers:
        if pkg is not None:
            out.append(
                Candidate(
                    "adabelief",
                    "adabelief_pytorch",
                    "adabelief_pytorch.AdaBelief(print_change_log=False)",
                    lambda ps: _quiet(pkg, ps, print_change_log=False),
                    max_tensors=ADABELIEF_PKG_MAX_TENSORS,
                )
            )
        out += [
            Candidate(
                "adabelief",
                "torch_adam_fused",
                "torch.optim.Adam(fused=True) (nearest fused baseline, not AdaBelief)",
                PROVIDERS["torch_fused"],
            ),
            Candidate(
                "adabelief",
                "fasthist_notrack",
                "fasthist.AdaBelief(track=False)",
                lambda ps: fasthist.AdaBelief(ps, track=False),
            ),
            Candidate(
                "adabelief",
                "fasthist_track",
                "fasthist.AdaBelief(track=True)",
                lambda ps: fasthist.AdaBelief(ps, track=True),
            ),
        ]
    return out


def group_of(row: dict) -> str:
    """The row group a row's baseline is chosen in (:data:`BASELINES`)."""
    return row["optimizer"] + ("+scaler" if row["provider"].endswith("+scaler") else "")


# -- timing -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], object], steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls: CUDA events on the GPU (nothing else is
    timed), ``perf_counter`` around a synchronised call on the CPU (dry run)."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 20) -> float:
    """GB/s of ``dst.copy_(src)``, counting read + write: ``2 * nbytes / t``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    ms = statistics.median(time_steps(lambda: dst.copy_(src), reps, device))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# -- one measurement ----------------------------------------------------------------------
def make_params(shapes, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_()
        p.grad = (torch.randn(s, generator=gen, device=device, dtype=torch.float32) * 1e-2).to(dtype)
        params.append(p)
    return params


def scaled_step(opt, device: torch.device) -> Callable[[], None]:
    """``scaler.step(opt); scaler.update()`` with a fresh ``torch.amp.GradScaler``.

    ``init_scale=1`` (and no growth within a run): a fused step writes the unscaled
    gradients back, so with any other scale the kept gradients would shrink step after step;
    the work is the same (the inf/NaN check reads every gradient, the kernels divide by the
    scale tensor and read ``found_inf``)."""
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=1_000_000)
    scaler.scale(torch.ones((), device=device))  # the scaler creates its scale tensor lazily, here

    def step() -> None:
        scaler.step(opt)
        scaler.update()

    return step


def measure(
    provider: str | Callable[[list[torch.Tensor]], object],
    params: list[torch.Tensor],
    steps: int,
    warmup: int,
    device: torch.device,
    scaler: bool = False,
) -> float:
    """Median ms of one step of ``provider`` (a name in :data:`PROVIDERS` or a factory);
    with ``scaler``, of ``scaler.step(opt); scaler.update()``."""
    factory = PROVIDERS[provider] if isinstance(provider, str) else provider
    opt = factory(params)
    step = scaled_step(opt, device) if scaler else opt.step
    for _ in range(warmup):  # lazy state, Triton compilation, table caches
        step()
    _sync(device)
    ms = statistics.median(time_steps(step, steps, device))
    del opt, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms


PROBE_SHAPES = [(1000,), (24, 40)]


def probe(c: Candidate, dtype: torch.dtype, device: torch.device) -> str | None:
    """None if ``c`` takes two steps on two small tensors with finite results, else why not
    (the first line of the error)."""
    try:
        params = make_params(PROBE_SHAPES, dtype, device)
        opt = c.factory(params)
        step = scaled_step(opt, device) if c.scaler else opt.step
        for _ in range(2):
            step()
        _sync(device)
        if not all(bool(torch.isfinite(p).all()) for p in params):
            return "non-finite parameters after two steps on small tensors"
    except Exception as e:  # an unsupported dtype/device, a missing kernel, a compile error
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
    return None


# -- time estimate (H200) -----------------------------------------------------------------
# A rough model, for planning only: a step costs max(device time, host time) + 0.05 ms, the
# device moving MULT x the step's bytes at EST_BW, the host spending HOST_US per tensor
# (this project's CPU measurement of torch's fused Adam, 3.3 us/tensor, rounded up); each
# fasthist kernel specialisation compiles once (EST_COMPILE_S); each measurement adds
# EST_SETUP_S (optimizer state, gc, empty_cache); imports, CUDA start and copy test EST_FIXED_S.
EST_BW = 4.0e12
EST_MULT = {"fused": 1.0, "foreach": 2.5, "hist": 3.5, "loop": 6.0}
EST_HOST_US = {"fused": 4.0, "foreach": 6.0, "hist": 35.0, "loop": 150.0}
EST_SCALER_HOST_US = 3.0
EST_COMPILE_S = 4.0
EST_SETUP_S = 0.3
EST_FIXED_S = 15.0


def provider_kind(provider: str) -> str:
    base = provider.removesuffix("+scaler")
    if base == "torch_fused+hist":
        return "hist"
    if base == "torch_foreach":
        return "foreach"
    if base == "adabelief_pytorch":
        return "loop"
    return "fused"


def est_step_ms(optimizer: str, provider: str, numel: int, tensors: int, elem: int, scaler: bool) -> float:
    kind = provider_kind(provider)
    nbytes = (ACCESSES[optimizer] + (1 if scaler else 0)) * numel * elem
    device_ms = nbytes * EST_MULT[kind] / EST_BW * 1e3
    host_ms = tensors * (EST_HOST_US[kind] + (EST_SCALER_HOST_US if scaler else 0.0)) / 1e3
    return max(device_ms, host_ms) + 0.05


def kernel_key(optimizer: str, provider: str, dtype: str, scaler: bool) -> tuple | None:
    """The fasthist kernel specialisation a provider compiles (None for torch's own)."""
    if not provider.startswith("fasthist"):
        return None
    return (optimizer, dtype, "notrack" not in provider, scaler)


def set_size(name: str) -> tuple[int, int]:
    shapes = gpu_param_shapes(name)
    return sum(math.prod(s) for s in shapes), len(shapes)


def plan_extra(scaler_sets, scaler_dtypes, opt_sets, opt_dtypes, optimizers) -> list[tuple[str, str, list[Candidate]]]:
    """(set, dtype, candidates) of the issue-5 rows, in the order they run."""
    sc, oc = scaler_candidates(), other_candidates(optimizers)
    plan = []
    for s in SETS:
        for d in DTYPES:
            jobs = (sc if s in scaler_sets and d in scaler_dtypes else []) + (
                oc if s in opt_sets and d in opt_dtypes else []
            )
            if jobs:
                plan.append((s, d, jobs))
    return plan


def estimate(main: list[tuple[str, str, str]], extra, steps: int, warmup: int, xsteps: int, xwarmup: int) -> dict:
    """Seconds the run should take on an H200: ``{"main", "extra", "compile", "total"}``."""
    sizes = {s: set_size(s) for s in SETS}
    seen: set[tuple] = set()
    out = {"main": 0.0, "extra": 0.0, "compile": 0.0}

    def add(part, optimizer, provider, s, d, scaler, n):
        numel, tensors = sizes[s]
        elem = torch.empty((), dtype=DTYPES[d]).element_size()
        out[part] += n * est_step_ms(optimizer, provider, numel, tensors, elem, scaler) / 1e3 + EST_SETUP_S
        key = kernel_key(optimizer, provider, d, scaler)
        if key is not None and key not in seen:
            seen.add(key)
            out["compile"] += EST_COMPILE_S

    for s, d, prov in main:
        add("main", "adam", prov, s, d, False, steps + warmup)
    for s, d, jobs in extra:
        done = set()
        for c in jobs:
            if (c.optimizer, c.provider) in done or (c.max_tensors is not None and sizes[s][1] > c.max_tensors):
                continue
            done.add((c.optimizer, c.provider))
            add("extra", c.optimizer, c.provider, s, d, c.scaler, xsteps + xwarmup)
    out["total"] = EST_FIXED_S + out["main"] + out["extra"] + out["compile"]
    return out


# -- report -------------------------------------------------------------------------------
GROUP_ORDER = tuple(BASELINES)


def assign_baselines(rows: list[dict]) -> None:
    """Sets each row's ``baseline``: the first of :data:`BASELINES` measured in its group,
    set and dtype (None if none was)."""
    present: dict[tuple, set[str]] = {}
    for r in rows:
        present.setdefault((group_of(r), r["set"], r["dtype"]), set()).add(r["provider"])
    for r in rows:
        have = present[(group_of(r), r["set"], r["dtype"])]
        r["baseline"] = next((b for b in BASELINES.get(group_of(r), ()) if b in have), None)


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
    return sorted(rows, key=lambda r: (GROUP_ORDER.index(group_of(r)), SETS.index(r["set"]), dorder.index(r["dtype"])))


def table(rows: list[dict], copy_gbps: float) -> str:
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
    """Issue 3's speed targets (Adam rows without a scaler): (target, measured figure, met)."""
    adam = [r for r in rows if group_of(r) == "adam"]
    by = {(r["set"], r["dtype"], r["provider"]): r for r in adam}
    rat = {k[1:]: v for k, v in ratios(adam).items()}
    out: list[tuple[str, str, bool | None]] = []
    for s in SETS:
        for d in DTYPES:
            key = (s, d, "fasthist_track")
            if key in rat:
                out.append((f"fasthist_track <= 1.03x torch_fused, set {s} {d}", f"{rat[key]:.3f}x", rat[key] <= 1.03))
            hist = by.get((s, d, "torch_fused+hist"))
            if key in by and hist is not None:
                speedup = hist["ms"] / by[key]["ms"]
                out.append(
                    (
                        f"fasthist_track >= 2x faster than torch_fused+hist, set {s} {d}",
                        f"{speedup:.2f}x",
                        speedup >= 2.0,
                    )
                )
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


def dry_run_shapes(name: str) -> list[tuple[int, ...]]:
    """The sets shrunk (same tensor counts for b and c), for --dry-run on a CPU."""
    shapes = gpu_param_shapes(name)
    if name == "a":
        shapes = shapes[:20]
    return [tuple(max(1, d // (256 if name != "c" else 1000)) for d in s) for s in shapes]


SWEEP = [(1024, 4, 4), (1024, 8, 4), (2048, 4, 8), (2048, 8, 8), (4096, 2, 8), (512, 8, 4)]


def sweep(sets, dtypes, shapes_of, steps, warmup, device, out_dir, dry_run) -> int:
    """ms/step of fasthist_track (and torch_fused, the yardstick) per launch shape."""
    from fasthist.kernels import adam as kernel

    default = (kernel.BLOCK, kernel.ITERS, kernel.NUM_WARPS)
    rows = []
    try:
        for s in sets:
            for d in dtypes:
                params = make_params(shapes_of(s), DTYPES[d], device)
                fused = measure("torch_fused", params, steps, warmup, device)
                print(f"set {s} {d}: torch_fused {fused:.3f} ms")
                for block, iters, warps in SWEEP:
                    kernel.configure(block, iters, warps)
                    ms = measure("fasthist_track", params, steps, warmup, device)
                    rows.append(
                        {
                            "set": s,
                            "dtype": d,
                            "block": block,
                            "iters": iters,
                            "num_warps": warps,
                            "ms": ms,
                            "x_fused": ms / fused,
                        }
                    )
                    print(
                        f"  BLOCK={block:<5} ITERS={iters:<2} warps={warps}: {ms:8.3f} ms  {ms / fused:.3f}x fused",
                        flush=True,
                    )
                del params
                gc.collect()
    finally:
        kernel.configure(*default)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    if out_dir is None:
        out_dir = Path(tempfile.gettempdir()) if dry_run else HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{'dryrun' if dry_run else 'gpu'}-{date}-sweep.json"
    path.write_text(json.dumps({"date": date, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


# -- issue 5 rows -------------------------------------------------------------------------
def run_extra(plan, shapes_of, device, args, t_start: float, rows: list[dict], skipped: list[dict]) -> None:
    """Measures the issue-5 rows of ``plan`` (see :func:`plan_extra`) into ``rows``; what
    could not be measured goes into ``skipped`` with the reason."""
    probes: dict[tuple, str | None] = {}
    compiled: set[tuple] = set()
    xs, xw = args.extra_steps, args.extra_warmup

    def skip(s, d, opt, prov, reason):
        skipped.append({"set": s, "dtype": d, "optimizer": opt, "provider": prov, "reason": reason})
        print(f"  skip {opt}/{prov}: {reason}", flush=True)

    for s, d, jobs in plan:
        shapes = shapes_of(s)
        numel_full, tensors_full = set_size(s)  # the estimate is for the real (H200) sets
        by_name: dict[tuple[str, str], list[Candidate]] = {}
        for c in jobs:
            by_name.setdefault((c.optimizer, c.provider), []).append(c)
        print(f"set {s} {d} (issue 5 rows): {len(shapes)} tensors", flush=True)
        if time.perf_counter() - t_start > args.budget_s:
            for opt, prov in by_name:
                skip(s, d, opt, prov, f"time budget: over --budget-s {args.budget_s:.0f} s before this set")
            continue
        chosen: list[Candidate] = []
        for (opt, prov), cands in by_name.items():
            limit = cands[0].max_tensors
            if limit is not None and len(shapes) > limit:
                skip(s, d, opt, prov, f"{len(shapes)} tensors > {limit}: it steps tensor by tensor in Python")
                continue
            reasons = []
            for c in cands:
                key = (c.optimizer, c.call, c.scaler, d)
                if key not in probes and time.perf_counter() - t_start + EST_COMPILE_S > args.budget_s:
                    reasons.append(f"time budget: no time left to try {c.call} (--budget-s {args.budget_s:.0f} s)")
                    continue
                if key not in probes:
                    probes[key] = probe(c, DTYPES[d], device)
                if probes[key] is None:
                    chosen.append(c)
                    if reasons:
                        print(f"  {opt}/{prov}: using {c.call} ({'; '.join(reasons)})", flush=True)
                    break
                reasons.append(f"{c.call} failed: {probes[key]}")
            else:
                skip(s, d, opt, prov, "; ".join(reasons))
        if not chosen:
            continue
        params = make_params(shapes, DTYPES[d], device)
        elem = params[0].element_size()
        for c in chosen:
            key = kernel_key(c.optimizer, c.provider, d, c.scaler)
            est = (xs + xw) * est_step_ms(c.optimizer, c.provider, numel_full, tensors_full, elem, c.scaler) / 1e3
            est += EST_SETUP_S + (EST_COMPILE_S if key is not None and key not in compiled else 0.0)
            elapsed = time.perf_counter() - t_start
            if elapsed + est > args.budget_s:
                skip(
                    s,
                    d,
                    c.optimizer,
                    c.provider,
                    f"time budget: {elapsed:.0f} s elapsed + ~{est:.1f} s estimated > --budget-s {args.budget_s:.0f} s",
                )
                continue
            try:
                ms = measure(c.factory, params, xs, xw, device, scaler=c.scaler)
            except Exception as e:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                lines = str(e).strip().splitlines()
                skip(s, d, c.optimizer, c.provider, f"{type(e).__name__}: {lines[0][:300] if lines else ''}")
                continue
            if key is not None:
                compiled.add(key)
            nbytes = step_bytes(params, c.optimizer, c.scaler)
            rows.append(
                {
                    "set": s,
                    "dtype": d,
                    "optimizer": c.optimizer,
                    "provider": c.provider,
                    "call": c.call,
                    "ms": ms,
                    "gbps": nbytes / (ms * 1e-3) / 1e9,
                }
            )
            print(
                f"  {c.optimizer:<10}{c.provider:<23}{ms:>10.3f} ms   ({time.perf_counter() - t_start:.0f} s elapsed)",
                flush=True,
            )
        del params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# -- main ---------------------------------------------------------------------------------
def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--dtypes", default=",".join(MAIN_DTYPES))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--scaler-sets", default=",".join(SETS), help="sets of the GradScaler rows ('' for none)")
    ap.add_argument("--scaler-dtypes", default=",".join(SCALER_DTYPES), help="dtypes of the GradScaler rows")
    ap.add_argument("--opt-sets", default=",".join(SETS), help="sets of the other optimizers' rows ('' for none)")
    ap.add_argument("--opt-dtypes", default=",".join(MAIN_DTYPES), help="dtypes of the other optimizers' rows")
    ap.add_argument("--optimizers", default=",".join(OTHER_OPTIMIZERS), help="the other optimizers ('' for none)")
    ap.add_argument("--extra-steps", type=int, default=30, help="timed steps of each issue-5 row")
    ap.add_argument("--extra-warmup", type=int, default=3)
    ap.add_argument("--no-extra", action="store_true", help="the Adam rows of issue 3 only")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=270.0,
        help="skip (and report) issue-5 rows that would end after this many seconds",
    )
    ap.add_argument("--copy-gib", type=float, default=2.0, help="size of the copy-bandwidth buffer")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: bench/results (a temp dir for --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sets, few steps: checks the pipeline only")
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="instead of the report: fasthist_track on the chosen sets for several kernel launch shapes "
        "(BLOCK, ITERS, NUM_WARPS), to pick the defaults of fasthist.kernels.adam",
    )
    args = ap.parse_args(argv)

    sets, dtypes, providers = _names(args.sets), _names(args.dtypes), _names(args.providers)
    scaler_sets, scaler_dtypes = _names(args.scaler_sets), _names(args.scaler_dtypes)
    opt_sets, opt_dtypes, optimizers = _names(args.opt_sets), _names(args.opt_dtypes), _names(args.optimizers)
    for name, values, known in (
        ("set", sets + scaler_sets + opt_sets, SETS),
        ("dtype", dtypes + scaler_dtypes + opt_dtypes, DTYPES),
        ("provider", providers, PROVIDERS),
        ("optimizer", optimizers, OTHER_OPTIMIZERS),
    ):
        bad = [v for v in values if v not in known]
        if bad:
            ap.error(f"unknown {name}(s) {bad}; expected some of {list(known)}")
    if args.no_extra:
        scaler_sets, opt_sets = [], []

    if args.dry_run:
        device, gpu, shapes_of = torch.device("cpu"), "cpu (dry run)", dry_run_shapes
        torch.set_num_threads(1)  # tiny tensors; OpenMP threads only contend with other work on a small CPU
        plan_steps = (args.steps, args.warmup, args.extra_steps, args.extra_warmup)
        args.steps, args.warmup, args.copy_gib = min(args.steps, 3), min(args.warmup, 1), min(args.copy_gib, 0.0625)
        args.extra_steps, args.extra_warmup = min(args.extra_steps, 2), min(args.extra_warmup, 1)
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_report.py needs a CUDA device (none found); use --dry-run to check the pipeline on a CPU",
                file=sys.stderr,
            )
            return 2
        device, gpu, shapes_of = torch.device("cuda"), torch.cuda.get_device_name(0), gpu_param_shapes
        plan_steps = (args.steps, args.warmup, args.extra_steps, args.extra_warmup)
        from fasthist.backend import kernels_module, select_backend

        if select_backend(device) != "triton":
            err = getattr(sys.modules.get("fasthist.backend"), "_kernels_error", None)
            print(
                f"fasthist would not use its Triton kernels on {gpu} ({err!r}); check FASTHIST_BACKEND and triton",
                file=sys.stderr,
            )
            return 3
        print(f"fasthist kernels: {kernels_module().__name__}")

    if args.sweep:
        return sweep(sets, dtypes, shapes_of, args.steps, args.warmup, device, args.out_dir, args.dry_run)

    extra = plan_extra(scaler_sets, scaler_dtypes, opt_sets, opt_dtypes, optimizers)
    main_plan = [(s, d, p) for s in sets for d in dtypes for p in providers]
    est = estimate(main_plan, extra, *plan_steps)
    print(
        f"estimated time on an H200: ~{est['total']:.0f} s (issue-3 Adam rows ~{est['main']:.0f} s, issue-5 rows "
        f"~{est['extra']:.0f} s, Triton compiles ~{est['compile']:.0f} s, start-up ~{EST_FIXED_S:.0f} s; a rough "
        f"model: {EST_BW / 1e12:.1f} TB/s, per-tensor host costs); issue-5 rows stop at --budget-s {args.budget_s:.0f} s"
        + (" [dry run: the estimate is for the full sets on an H200, not for this CPU]" if args.dry_run else ""),
        flush=True,
    )
    if "adabelief" in optimizers and opt_sets:
        pkg, version = adabelief_package()
        print(
            f"adabelief_pytorch {version}: AdaBelief rows compare with it (sets of <= {ADABELIEF_PKG_MAX_TENSORS} tensors)"
            if pkg is not None
            else f"adabelief_pytorch not importable ({version}): AdaBelief rows compare with torch.optim.Adam(fused=True), "
            "the nearest fused baseline (not the same algorithm)"
        )

    copy_gbps = copy_bandwidth(device, int(args.copy_gib * 2**30))
    print(f"{gpu}: torch {torch.__version__}, device-to-device copy {copy_gbps:.1f} GB/s")
    rows: list[dict] = []
    for s in sets:
        shapes = shapes_of(s)
        for d in dtypes:
            params = make_params(shapes, DTYPES[d], device)
            nbytes = step_bytes(params, "adam")
            numel = sum(p.numel() for p in params)
            print(f"set {s} {d}: {len(params)} tensors, {numel / 1e6:.1f}M parameters, {nbytes / 1e9:.2f} GB per step")
            for prov in providers:
                ms = measure(prov, params, args.steps, args.warmup, device)
                rows.append(
                    {
                        "set": s,
                        "dtype": d,
                        "optimizer": "adam",
                        "provider": prov,
                        "ms": ms,
                        "gbps": nbytes / (ms * 1e-3) / 1e9,
                    }
                )
                print(f"  {prov:<18}{ms:>10.3f} ms   ({time.perf_counter() - t_start:.0f} s elapsed)", flush=True)
            del params
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    skipped: list[dict] = []
    if extra:
        run_extra(extra, shapes_of, device, args, t_start, rows, skipped)
    assign_baselines(rows)

    print()
    print(table(rows, copy_gbps))
    if skipped:
        print("\nnot measured:")
        for k in skipped:
            print(f"  set {k['set']} {k['dtype']} {k['optimizer']}/{k['provider']}: {k['reason']}")
    print()
    for name, figure, met in targets(rows, copy_gbps):
        print(f"{'MET ' if met else 'MISS'}  {name}: {figure}")
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    elapsed = time.perf_counter() - t_start
    out = report_json(
        rows,
        copy_gbps,
        gpu,
        date,
        skipped,
        {
            "steps": {"adam": args.steps, "issue5": args.extra_steps},
            "estimate_s": round(est["total"], 1),
            "elapsed_s": round(elapsed, 1),
        },
    )
    if args.out_dir is None:
        args.out_dir = Path(tempfile.gettempdir()) if args.dry_run else HERE / "results"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / (f"gpu-{date}.json" if not args.dry_run else f"dryrun-{date}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path} ({elapsed:.0f} s in all; estimated ~{est['total']:.0f} s on an H200)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
