"""GPU report of record for issue 3: one script, under 5 minutes on one H200.

    python bench/gpu_report.py                 # all sets, fp32 and bf16, every provider
    python bench/gpu_report.py --dry-run       # the whole pipeline on the CPU, tiny sets
    python bench/gpu_report.py --sweep --sets a,c --dtypes fp32   # tune the kernel's launch shape

Measures the device-to-device copy bandwidth, then one ``opt.step()`` of every provider on
the sets of ``providers.gpu_param_shapes`` ((a) 1.1B parameters in 201 tensors, (b) GPT-2
small, (c) 2,000 small tensors totalling 20M), with float32 and bfloat16 parameters (states
in the parameter dtype, as torch keeps them). Each figure is the median of ``--steps``
(default 50) steps after ``--warmup`` steps, timed with CUDA events around ``step()`` alone
(gradients are set once and kept). GB/s counts the bytes an Adam step must move (7 accesses
per element: read p, g, m, v; write p, m, v), the same for every provider, so it is
comparable with the copy bandwidth (read + write of the copied bytes).

Prints a table (ms/step, GB/s, % of copy bandwidth, ratio to torch_fused), the issue's
targets with the measured figure, and writes ``bench/results/gpu-<YYYY-MM-DD>.json``::

    {"date", "gpu", "torch", "triton", "copy_gbps",
     "rows": [{"set", "dtype", "provider", "ms", "gbps"}]}

Runs with torch >= 2.6, triton >= 3.2, Python >= 3.10. Exits with status 2 and a message
when there is no CUDA device (and ``--dry-run`` was not given), 3 when fasthist would not
use its Triton kernels on the GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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

from providers import TorchFusedPlusHist, adam_bytes, gpu_param_shapes  # noqa: E402

PROVIDERS: dict[str, Callable[[list[torch.Tensor]], object]] = {
    "torch_foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch_fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "fasthist_notrack": lambda ps: fasthist.Adam(ps, fused=True, track=False),
    "fasthist_track": lambda ps: fasthist.Adam(ps, fused=True, track=True),
    "torch_fused+hist": lambda ps: TorchFusedPlusHist(ps),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SETS = ("a", "b", "c")


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


def measure(provider: str, params: list[torch.Tensor], steps: int, warmup: int, device: torch.device) -> float:
    opt = PROVIDERS[provider](params)
    for _ in range(warmup):  # lazy state, Triton compilation, table caches
        opt.step()
    _sync(device)
    ms = statistics.median(time_steps(opt.step, steps, device))
    del opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms


# -- report -------------------------------------------------------------------------------
def ratios(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    """``ms / ms(torch_fused)`` per (set, dtype, provider) of the same run."""
    base = {(r["set"], r["dtype"]): r["ms"] for r in rows if r["provider"] == "torch_fused"}
    return {
        (r["set"], r["dtype"], r["provider"]): r["ms"] / base[(r["set"], r["dtype"])]
        for r in rows
        if (r["set"], r["dtype"]) in base
    }


def table(rows: list[dict], copy_gbps: float) -> str:
    rat = ratios(rows)
    lines = [
        f"{'set':<4}{'dtype':<6}{'provider':<18}{'ms/step':>10}{'GB/s':>10}{'% copy':>9}{'x fused':>9}",
        "-" * 66,
    ]
    for r in rows:
        x = rat.get((r["set"], r["dtype"], r["provider"]))
        lines.append(
            f"{r['set']:<4}{r['dtype']:<6}{r['provider']:<18}{r['ms']:>10.3f}{r['gbps']:>10.1f}"
            f"{100 * r['gbps'] / copy_gbps:>8.1f}%{(f'{x:.3f}' if x is not None else '-'):>9}"
        )
    return "\n".join(lines)


def targets(rows: list[dict], copy_gbps: float) -> list[tuple[str, str, bool | None]]:
    """The issue's speed targets: (target, measured figure, met; None if not measured)."""
    by = {(r["set"], r["dtype"], r["provider"]): r for r in rows}
    rat = ratios(rows)
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


def report_json(rows: list[dict], copy_gbps: float, gpu: str, date: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": date,
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "copy_gbps": round(copy_gbps, 1),
        "rows": [
            {
                "set": r["set"],
                "dtype": r["dtype"],
                "provider": r["provider"],
                "ms": round(r["ms"], 4),
                "gbps": round(r["gbps"], 1),
            }
            for r in rows
        ],
    }


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


# -- main ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
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

    sets = [s for s in args.sets.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    providers = [p for p in args.providers.split(",") if p]
    for name, values, known in (("set", sets, SETS), ("dtype", dtypes, DTYPES), ("provider", providers, PROVIDERS)):
        bad = [v for v in values if v not in known]
        if bad:
            ap.error(f"unknown {name}(s) {bad}; expected some of {list(known)}")

    if args.dry_run:
        device, gpu, shapes_of = torch.device("cpu"), "cpu (dry run)", dry_run_shapes
        args.steps, args.warmup, args.copy_gib = min(args.steps, 3), min(args.warmup, 1), min(args.copy_gib, 0.0625)
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_report.py needs a CUDA device (none found); use --dry-run to check the pipeline on a CPU",
                file=sys.stderr,
            )
            return 2
        device, gpu, shapes_of = torch.device("cuda"), torch.cuda.get_device_name(0), gpu_param_shapes
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

    t_start = time.perf_counter()
    copy_gbps = copy_bandwidth(device, int(args.copy_gib * 2**30))
    print(f"{gpu}: torch {torch.__version__}, device-to-device copy {copy_gbps:.1f} GB/s")
    rows: list[dict] = []
    for s in sets:
        shapes = shapes_of(s)
        for d in dtypes:
            params = make_params(shapes, DTYPES[d], device)
            nbytes = adam_bytes(params)
            numel = sum(p.numel() for p in params)
            print(f"set {s} {d}: {len(params)} tensors, {numel / 1e6:.1f}M parameters, {nbytes / 1e9:.2f} GB per step")
            for prov in providers:
                ms = measure(prov, params, args.steps, args.warmup, device)
                rows.append({"set": s, "dtype": d, "provider": prov, "ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9})
                print(f"  {prov:<18}{ms:>10.3f} ms   ({time.perf_counter() - t_start:.0f} s elapsed)", flush=True)
            del params
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print()
    print(table(rows, copy_gbps))
    print()
    for name, figure, met in targets(rows, copy_gbps):
        print(f"{'MET ' if met else 'MISS'}  {name}: {figure}")
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = report_json(rows, copy_gbps, gpu, date)
    if args.out_dir is None:
        args.out_dir = Path(tempfile.gettempdir()) if args.dry_run else HERE / "results"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / (f"gpu-{date}.json" if not args.dry_run else f"dryrun-{date}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
