"""GPU report of record: one script, under 5 minutes on one H200.

    python bench/gpu_report.py                 # everything below, with the time estimate
    python bench/gpu_report.py --dry-run       # the whole pipeline on the CPU, tiny sets
    python bench/gpu_report.py --sweep --sets a,c --dtypes fp32   # tune the kernel's launch shape

Measures the device-to-device copy bandwidth, then one ``opt.step()`` of every Adam provider
(``providers.ADAM_PROVIDERS``) on the sets of ``harness.gpu_param_shapes`` ((a) 1.1B
parameters in 201 tensors, (b) GPT-2 small, (c) 2,000 small tensors totalling 20M), with
float32 and bfloat16 parameters (states in the parameter dtype, as torch keeps them). Each
figure is the median of ``--steps`` (default 50) steps after ``--warmup`` steps, timed with
CUDA events around ``step()`` alone (gradients are set once and kept). GB/s counts the bytes
a step must move (``harness.ACCESSES``: 7 accesses per element for Adam, read p, g, m, v;
write p, m, v), the same for every provider of a row group, so it is comparable with the
copy bandwidth (read + write of the copied bytes).

Then the GradScaler and other-optimizer rows, from the table of ``candidates.CANDIDATES``
(``--candidate-steps``, default 30, after ``--candidate-warmup`` steps; each candidate is
first tried on two small tensors, and one that fails there is reported as skipped with the
error instead of stopping the report):

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

Every row names its ``baseline`` (the ratio column, ``report.BASELINES``): ``torch_fused``
for Adam, ``torch_fused+scaler`` for the GradScaler rows, ``torch_foreach`` for RMSprop,
Adagrad's ``torch_fused`` (else ``torch_foreach``), AdaBelief's ``adabelief_pytorch`` (else
``torch_adam_fused``). Before measuring, the script prints its estimate of the run's time on
an H200 (``time_model``: a rough bandwidth + host-overhead model); the GradScaler and
other-optimizer rows are skipped, and reported so, once the elapsed time plus a row's
estimate would pass ``--budget-s`` (default 270 s), so the whole run stays under 5 minutes.

Prints a table (ms/step, GB/s, % of copy bandwidth, ratio to the row's baseline), the
speed targets with the measured figure, and writes ``bench/results/gpu-<YYYY-MM-DD>.json``::

    {"date", "gpu", "torch", "triton", "copy_gbps",
     "rows": [{"set", "dtype", "optimizer", "provider", "ms", "gbps", "baseline"[, "call"]}],
     "skipped": [{"set", "dtype", "optimizer", "provider", "reason"}],
     "steps": {"adam", "candidates"}, "estimate_s", "elapsed_s"}

(``optimizer`` is "adam" for the Adam rows; the GradScaler and other-optimizer rows add
``call``, the constructor that was measured. ``--adam-only`` runs the Adam rows alone. Files
of older versions name ``steps.candidates`` ``issue5``; ``report.read_report`` reads both.)

Runs with torch >= 2.6, triton >= 3.2, Python >= 3.10. Exits with status 2 and a message
when there is no CUDA device (and ``--dry-run`` was not given), 3 when fasthist would not
use its Triton kernels on the GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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

# The bench modules import fasthist (providers, candidates): only once it is found.
import time_model  # noqa: E402
from candidates import ADABELIEF_PKG_MAX_TENSORS, OTHER_OPTIMIZERS, CandidateRows, plan_candidates  # noqa: E402
from harness import (  # noqa: E402
    DTYPES,
    GPU_SETS,
    copy_bandwidth,
    dry_run_shapes,
    free_memory,
    gpu_param_shapes,
    make_params,
    measure,
    step_bytes,
)
from providers import ADAM_PROVIDERS, adabelief_package  # noqa: E402
from report import assign_baselines, report_json, table, targets  # noqa: E402

ADAM_DTYPES = ("fp32", "bf16")
SCALER_DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class Run:
    """What one invocation measures, and where: the parsed arguments, the chosen sets,
    dtypes, providers and optimizers, the device and the shapes of a set on it."""

    args: argparse.Namespace
    sets: list[str]
    dtypes: list[str]
    providers: list[str]
    scaler_sets: list[str]
    scaler_dtypes: list[str]
    opt_sets: list[str]
    opt_dtypes: list[str]
    optimizers: list[str]
    t_start: float
    device: torch.device = torch.device("cpu")
    gpu: str = ""
    shapes_of: Callable[[str], list[tuple[int, ...]]] = gpu_param_shapes
    plan_steps: tuple[int, int, int, int] = (0, 0, 0, 0)  # the steps asked for, before --dry-run caps them

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def out_path(self, date: str, suffix: str = "") -> Path:
        """bench/results/gpu-<date><suffix>.json (dryrun-..., in a temp dir, for --dry-run)."""
        out_dir = self.args.out_dir
        if out_dir is None:
            out_dir = Path(tempfile.gettempdir()) if self.args.dry_run else HERE / "results"
        out_dir.mkdir(parents=True, exist_ok=True)
        return out_dir / f"{'dryrun' if self.args.dry_run else 'gpu'}-{date}{suffix}.json"


# -- arguments ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=",".join(GPU_SETS))
    ap.add_argument("--dtypes", default=",".join(ADAM_DTYPES))
    ap.add_argument("--providers", default=",".join(ADAM_PROVIDERS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--scaler-sets", default=",".join(GPU_SETS), help="sets of the GradScaler rows ('' for none)")
    ap.add_argument("--scaler-dtypes", default=",".join(SCALER_DTYPES), help="dtypes of the GradScaler rows")
    ap.add_argument("--opt-sets", default=",".join(GPU_SETS), help="sets of the other optimizers' rows ('' for none)")
    ap.add_argument("--opt-dtypes", default=",".join(ADAM_DTYPES), help="dtypes of the other optimizers' rows")
    ap.add_argument("--optimizers", default=",".join(OTHER_OPTIMIZERS), help="the other optimizers ('' for none)")
    ap.add_argument(
        "--candidate-steps",
        "--extra-steps",
        type=int,
        default=30,
        help="timed steps of each GradScaler and other-optimizer row",
    )
    ap.add_argument("--candidate-warmup", "--extra-warmup", type=int, default=3)
    ap.add_argument("--adam-only", "--no-extra", action="store_true", help="the Adam rows only")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=270.0,
        help="skip (and report) GradScaler and other-optimizer rows that would end after this many seconds",
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
    return ap


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def parse(argv: list[str] | None, t_start: float) -> Run:
    """The arguments, checked (argparse's error and exit status 2 on an unknown name)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    run = Run(
        args,
        _names(args.sets),
        _names(args.dtypes),
        _names(args.providers),
        _names(args.scaler_sets),
        _names(args.scaler_dtypes),
        _names(args.opt_sets),
        _names(args.opt_dtypes),
        _names(args.optimizers),
        t_start,
    )
    for name, values, known in (
        ("set", run.sets + run.scaler_sets + run.opt_sets, GPU_SETS),
        ("dtype", run.dtypes + run.scaler_dtypes + run.opt_dtypes, DTYPES),
        ("provider", run.providers, ADAM_PROVIDERS),
        ("optimizer", run.optimizers, OTHER_OPTIMIZERS),
    ):
        bad = [v for v in values if v not in known]
        if bad:
            ap.error(f"unknown {name}(s) {bad}; expected some of {list(known)}")
    if args.adam_only:
        run.scaler_sets, run.opt_sets = [], []
    run.plan_steps = (args.steps, args.warmup, args.candidate_steps, args.candidate_warmup)
    return run


def choose_device(run: Run) -> int:
    """Sets the run's device, GPU name and set shapes (tiny CPU sets and capped steps for
    --dry-run); returns 0, or the exit status when there is no GPU or no Triton kernels."""
    args = run.args
    if args.dry_run:
        run.device, run.gpu, run.shapes_of = torch.device("cpu"), "cpu (dry run)", dry_run_shapes
        torch.set_num_threads(1)  # tiny tensors; OpenMP threads only contend with other work on a small CPU
        args.steps, args.warmup, args.copy_gib = min(args.steps, 3), min(args.warmup, 1), min(args.copy_gib, 0.0625)
        args.candidate_steps, args.candidate_warmup = min(args.candidate_steps, 2), min(args.candidate_warmup, 1)
        return 0
    if not torch.cuda.is_available():
        print(
            "gpu_report.py needs a CUDA device (none found); use --dry-run to check the pipeline on a CPU",
            file=sys.stderr,
        )
        return 2
    run.device, run.gpu, run.shapes_of = torch.device("cuda"), torch.cuda.get_device_name(0), gpu_param_shapes
    from fasthist.backend import kernels_module, requested

    if requested() not in ("auto", "triton") or kernels_module() is None:
        print(
            f"fasthist would not use its Triton kernels on {run.gpu} ({_kernels_import_error()!r}); "
            "check FASTHIST_BACKEND and triton",
            file=sys.stderr,
        )
        return 3
    print(f"fasthist kernels: {kernels_module().__name__}")
    return 0


def _kernels_import_error() -> BaseException | None:
    """Why ``fasthist.kernels`` does not import (None when it does)."""
    try:
        importlib.import_module("fasthist.kernels")
    except ImportError as e:
        return e
    return None


def print_estimate(run: Run, plan: list) -> dict[str, float]:
    adam_plan = [(s, d, p) for s in run.sets for d in run.dtypes for p in run.providers]
    steps, warmup, candidate_steps, candidate_warmup = run.plan_steps
    est = time_model.estimate(adam_plan, plan, steps + warmup, candidate_steps + candidate_warmup)
    print(
        f"estimated time on an H200: ~{est['total']:.0f} s (Adam rows ~{est['adam']:.0f} s, GradScaler and "
        f"other-optimizer rows ~{est['candidates']:.0f} s, Triton compiles ~{est['compile']:.0f} s, start-up "
        f"~{time_model.FIXED_S:.0f} s; a rough model: {time_model.BANDWIDTH / 1e12:.1f} TB/s, per-tensor host costs); "
        f"GradScaler and other-optimizer rows stop at --budget-s {run.args.budget_s:.0f} s"
        + (" [dry run: the estimate is for the full sets on an H200, not for this CPU]" if run.args.dry_run else ""),
        flush=True,
    )
    if "adabelief" in run.optimizers and run.opt_sets:
        pkg, version = adabelief_package()
        print(
            f"adabelief_pytorch {version}: AdaBelief rows compare with it (sets of <= {ADABELIEF_PKG_MAX_TENSORS} tensors)"
            if pkg is not None
            else f"adabelief_pytorch not importable ({version}): AdaBelief rows compare with torch.optim.Adam(fused=True), "
            "the nearest fused baseline (not the same algorithm)"
        )
    return est


# -- the Adam rows ------------------------------------------------------------------------
def measure_adam_rows(run: Run) -> list[dict]:
    """ms and GB/s of every chosen Adam provider per set and dtype."""
    args, device = run.args, run.device
    rows: list[dict] = []
    for s in run.sets:
        shapes = run.shapes_of(s)
        for d in run.dtypes:
            params = make_params(shapes, DTYPES[d], device)
            nbytes = step_bytes(params, "adam")
            numel = sum(p.numel() for p in params)
            print(f"set {s} {d}: {len(params)} tensors, {numel / 1e6:.1f}M parameters, {nbytes / 1e9:.2f} GB per step")
            for prov in run.providers:
                ms = measure(ADAM_PROVIDERS[prov], params, args.steps, args.warmup, device)
                row = {"set": s, "dtype": d, "optimizer": "adam", "provider": prov, "ms": ms}
                rows.append({**row, "gbps": nbytes / (ms * 1e-3) / 1e9})
                print(f"  {prov:<18}{ms:>10.3f} ms   ({run.elapsed():.0f} s elapsed)", flush=True)
            del params
            free_memory(device)
    return rows


# -- the report ---------------------------------------------------------------------------
def print_report(rows: list[dict], skipped: list[dict], copy_gbps: float) -> None:
    print()
    print(table(rows, copy_gbps))
    if skipped:
        print("\nnot measured:")
        for k in skipped:
            print(f"  set {k['set']} {k['dtype']} {k['optimizer']}/{k['provider']}: {k['reason']}")
    print()
    for name, figure, met in targets(rows, copy_gbps):
        print(f"{'MET ' if met else 'MISS'}  {name}: {figure}")


def write_report(run: Run, rows: list[dict], skipped: list[dict], copy_gbps: float, est: dict[str, float]) -> None:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    elapsed = run.elapsed()
    steps = {"adam": run.args.steps, "candidates": run.args.candidate_steps}
    run_info = {"steps": steps, "estimate_s": round(est["total"], 1), "elapsed_s": round(elapsed, 1)}
    out = report_json(rows, copy_gbps, run.gpu, date, skipped, run_info)
    path = run.out_path(date)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path} ({elapsed:.0f} s in all; estimated ~{est['total']:.0f} s on an H200)")


# -- kernel launch shapes -----------------------------------------------------------------
# (BLOCK, ITERS, NUM_WARPS); the default (1024, 16, 4) first. bench/sass_report.py predicts the
# per-program histogram zero/read/flush weighs less as ITERS grows (fewer, longer programs).
LAUNCH_SHAPES = [(1024, 16, 4), (1024, 8, 4), (1024, 32, 4), (2048, 8, 8), (2048, 16, 8), (512, 32, 4)]


def sweep_launch_shapes(run: Run) -> int:
    """ms/step of fasthist_track (and torch_fused, the yardstick) per launch shape
    (BLOCK, ITERS, NUM_WARPS) of every fused kernel (``fasthist.kernels.configure``)."""
    from fasthist.kernels import SHAPE, configure

    args, device = run.args, run.device
    default = (SHAPE.block, SHAPE.iters, SHAPE.num_warps)
    rows = []
    try:
        for s in run.sets:
            for d in run.dtypes:
                params = make_params(run.shapes_of(s), DTYPES[d], device)
                fused = measure(ADAM_PROVIDERS["torch_fused"], params, args.steps, args.warmup, device)
                print(f"set {s} {d}: torch_fused {fused:.3f} ms")
                for block, iters, warps in LAUNCH_SHAPES:
                    configure(block, iters, warps)
                    ms = measure(ADAM_PROVIDERS["fasthist_track"], params, args.steps, args.warmup, device)
                    shape = {"block": block, "iters": iters, "num_warps": warps}
                    rows.append({"set": s, "dtype": d, **shape, "ms": ms, "x_fused": ms / fused})
                    print(
                        f"  BLOCK={block:<5} ITERS={iters:<2} warps={warps}: {ms:8.3f} ms  {ms / fused:.3f}x fused",
                        flush=True,
                    )
                del params
                free_memory(device)
    finally:
        configure(*default)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    path = run.out_path(date, "-sweep")
    path.write_text(json.dumps({"date": date, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


# -- main ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    run = parse(argv, time.perf_counter())
    status = choose_device(run)
    if status:
        return status
    if run.args.sweep:
        return sweep_launch_shapes(run)

    plan = plan_candidates(run.scaler_sets, run.scaler_dtypes, run.opt_sets, run.opt_dtypes, run.optimizers)
    est = print_estimate(run, plan)
    copy_gbps = copy_bandwidth(run.device, int(run.args.copy_gib * 2**30))
    print(f"{run.gpu}: torch {torch.__version__}, device-to-device copy {copy_gbps:.1f} GB/s")
    rows = measure_adam_rows(run)
    args = run.args
    candidate_rows = CandidateRows(
        run.device, run.shapes_of, args.candidate_steps, args.candidate_warmup, args.budget_s, run.t_start
    )
    if plan:
        candidate_rows.measure_plan(plan)
    rows += candidate_rows.rows
    assign_baselines(rows)
    print_report(rows, candidate_rows.skipped, copy_gbps)
    write_report(run, rows, candidate_rows.skipped, copy_gbps, est)
    return 0


if __name__ == "__main__":
    sys.exit(main())
