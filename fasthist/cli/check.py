"""``fasthist check``: what runs on this machine, and whether it agrees with the reference.

Prints torch's, Triton's and CUDA's versions and the device (name, compute capability);
then, for each optimizer of :func:`fasthist.catalog.declarations` and each dtype its Triton
kernel takes, one tracked step of a small model-free parameter: the backend the dispatcher
chose and why (``opt.backends()``), the histogram strategy, the shared-memory guard's verdict
and the device self-test's result (:mod:`fasthist.selftest`). On ``--device cuda`` the step
asks for ``auto`` (what a user gets); on the CPU for ``triton``, which runs the kernels under
Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernels are imported): the CPU
has no guard to run (it reads the PTX of a GPU compile) and uses the interpreter's twin of
the shared histogram. Exit status 0 when every self-test agreed, 1 when any differed.

Then (unless ``--no-bench``) a short overhead benchmark of the default optimizer
(:func:`fasthist.catalog.default`, ``fused=True``) on ``--bench-params``
float32 parameters with the backend a user gets (``auto``): the tracked step against torch's
fused step and against fasthist's untracked step (best of 3 interleaved rounds, as
``fasthist bench``); on a GPU also the tracked step's bytes/s (7 float32 words per element:
parameter, moments read and written, gradient read) against a measured device copy
(``copy_`` of 256 MiB, read and write counted).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any

import torch

from .args import UsageError, positive_int, resolve_device
from .output import json_text, table

__all__ = ["add_parser", "run"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "complex64": torch.complex64}


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        parents=parents,
        help="which backend runs each optimizer here, and its self-test against the reference",
        description="Say what runs on this machine: versions, device, and per optimizer and dtype the backend, "
        "histogram strategy, guard verdict and device self-test. Exit 1 when a self-test differs.",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the findings as JSON to PATH")
    p.add_argument("--optimizers", default=None, help="comma-separated optimizer names (default: all)")
    p.add_argument("--dtypes", default=None, help=f"comma-separated dtypes (default: all of {', '.join(_DTYPES)})")
    p.add_argument("--no-bench", action="store_true", help="skip the overhead benchmark")
    p.add_argument(
        "--bench-params",
        type=positive_int,
        default=None,
        help="parameters of the overhead benchmark (default: 1,000,000 on the CPU, 64,000,000 on a GPU)",
    )


def _names(text: str | None, known: list[str], what: str) -> list[str]:
    if text is None:
        return known
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise UsageError(f"--{what} {text!r}: expected names from {', '.join(known)}")
    return names


def _environment(device: str) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda, "device": device}
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        env["capability"] = f"sm_{major}{minor}"
    else:
        env["device_name"], env["capability"] = "CPU (no GPU: Triton kernels run under its interpreter)", None
    return env


def _strategy(verdict: Any, cuda: bool) -> tuple[str, str]:
    """(histogram strategy, guard verdict) of a self-tested specialisation."""
    if verdict is None:
        return "-", "-"
    if not cuda:
        strategy = "tl.histogram (self-test)" if verdict.histogram == "tl" else "words (interpreter twin of shared)"
        return strategy, "not run (reads a GPU compile's PTX)"
    guard = verdict.first.guard
    if verdict.histogram == "tl":
        return "tl.histogram (self-test)", "; ".join(guard) or "no refusal warned"
    return ("tl.histogram (guard)" if guard else "shared"), ("; ".join(guard) or "no refusal warned")


def _row(decl: Any, cls: Any, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """One tracked step of ``cls`` on a small ``dtype`` parameter; what ran and the self-test."""
    from .. import backend, selftest

    p = torch.randn(257, device=device).to(dtype).requires_grad_()
    p.grad = torch.randn_like(p)
    opt = cls([p], lr=1e-3)
    before = set(selftest.results())
    with warnings.catch_warnings(), backend.use("triton" if device == "cpu" else "auto"):
        warnings.simplefilter("ignore")  # what they say is in the row
        opt.step()
    (choice,) = opt.backends().values()
    new = [v for k, v in selftest.results().items() if k not in before and k[0] == decl.name]
    verdict = new[0] if new else None
    strategy, guard = _strategy(verdict, device.startswith("cuda"))
    if choice.backend != backend.TRITON:  # the histogram is the other backend's own
        strategy = "-"
    if verdict is not None:
        r = verdict.first
        ok = r.ok if r.compared else None
        test = {"ok": ok, "detail": r.detail, "edges": list(r.edges), "seconds": round(r.seconds, 3)}
        if verdict.retry is not None:
            test["retry_tl"] = {"ok": verdict.retry.ok, "detail": verdict.retry.detail}
    elif not selftest.enabled():
        test = {"ok": None, "detail": "off (FASTHIST_SELFTEST=0)"}
    else:
        test = {"ok": None, "detail": "not run (the Triton kernel did not take the call)"}
    return {
        "optimizer": decl.name,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": choice.backend,
        "reason": choice.reason,
        "strategy": strategy,
        "guard": guard,
        "selftest": test,
    }


def _cell(test: dict[str, Any]) -> str:
    if test["ok"] is None:
        return test["detail"]
    if test["ok"]:
        reached, asked = test["edges"]
        return f"agreed ({reached}/{asked} edge values, {test['seconds']:.1f} s)"
    retry = test.get("retry_tl")
    after = "; tl agreed" if retry and retry["ok"] else "; tl differed too" if retry else ""
    detail = test["detail"] if len(test["detail"]) <= 90 else test["detail"][:87] + "..."  # in full below
    return f"DIFFERED: {detail}{after}"


def _copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device ``copy_`` of 256 MiB (read and write), best of 5."""
    src = torch.empty(64 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def _overhead(device: str, total: int) -> dict[str, Any]:
    """The default optimizer's tracked fused step against torch's fused one and fasthist's
    untracked one."""
    from .. import backend
    from .bench import ROUNDS, bench_params, default_pair, time_steps

    params = bench_params(total, device)
    ours, theirs = default_pair()
    configs = {
        "torch fused": lambda: theirs(params, lr=1e-3, fused=True),
        "untracked": lambda: ours(params, lr=1e-3, fused=True, track=False),
        "tracked": lambda: ours(params, lr=1e-3, fused=True),
    }
    best: dict[str, float] = {}
    with backend.use("auto"):
        for _ in range(ROUNDS):
            for name, make in configs.items():
                best[name] = min(best.get(name, float("inf")), time_steps(make(), 5, device))
    elements = sum(p.numel() for p in params)
    out = {"params": elements, "ms": {k: 1e3 * v for k, v in best.items()}}
    out["tracked_vs_torch_fused"] = best["tracked"] / best["torch fused"]
    out["tracked_vs_untracked"] = best["tracked"] / best["untracked"]
    if device.startswith("cuda"):
        out["tracked_bytes_per_s"] = 7 * 4 * elements / best["tracked"]
        out["copy_bytes_per_s"] = _copy_bandwidth(device)
    return out


def _print_overhead(bench: dict[str, Any], device: str) -> None:
    from .bench import default_pair

    ms, name = bench["ms"], default_pair()[0].__name__
    print()
    print(
        f"overhead, {name}(fused=True) on {bench['params']:,} float32 parameters, {device}, best of 3 rounds: "
        f"tracked {ms['tracked']:.2f} ms = {bench['tracked_vs_torch_fused']:.2f}x torch's fused step "
        f"({ms['torch fused']:.2f} ms), {bench['tracked_vs_untracked']:.2f}x untracked ({ms['untracked']:.2f} ms)"
    )
    if "copy_bytes_per_s" in bench:
        tracked, copy = bench["tracked_bytes_per_s"], bench["copy_bytes_per_s"]
        print(f"tracked step: {tracked / 1e9:.0f} GB/s, {tracked / copy:.0%} of a device copy ({copy / 1e9:.0f} GB/s)")


def run(args: argparse.Namespace) -> int:
    from .. import backend, catalog

    device = resolve_device(args.device)
    decls = catalog.declarations()
    optimizers = _names(args.optimizers, [n for n, d in decls.items() if d.kernel is not None], "optimizers")
    dtypes = _names(args.dtypes, list(_DTYPES), "dtypes")
    kernels = backend.kernels_module(interpret=device == "cpu")  # before anything imports Triton
    env = _environment(device)
    env["kernels"] = "imported" if kernels is not None else f"not importable ({backend.kernels_error()})"
    rows = [
        _row(decls[name], catalog.optimizer_class(decls[name]), _DTYPES[dt], device)
        for name in optimizers
        for dt in dtypes
        if _DTYPES[dt] in decls[name].kernel_dtypes
    ]
    print(f"torch {env['torch']}, Triton {env['triton'] or 'not installed'}, CUDA {env['cuda'] or 'none'}")
    print(f"device: {device}: {env['device_name']}" + (f", {env['capability']}" if env["capability"] else ""))
    print(f"fasthist.kernels: {env['kernels']}")
    print()
    cells = [[r["optimizer"], r["dtype"], r["backend"], r["strategy"], r["guard"], _cell(r["selftest"])] for r in rows]
    print(table(["optimizer", "dtype", "backend", "histogram", "guard", "self-test"], cells, "llllll"))
    for r in rows:
        if r["reason"]:
            print(f"{r['optimizer']} {r['dtype']}: {r['reason']}")
    bench = None
    if not args.no_bench:
        total = args.bench_params or (64_000_000 if device.startswith("cuda") else 1_000_000)
        bench = _overhead(device, total)
        _print_overhead(bench, device)
    failed = [r for r in rows if r["selftest"]["ok"] is False]
    ok = not failed
    if args.json is not None:
        with open(args.json, "w") as f:
            f.write(json_text(dict(env, ok=ok, rows=rows, overhead=bench)))
    if failed:
        print(f"fasthist check: {len(failed)} of {len(rows)} self-tests differed from the reference", file=sys.stderr)
        return 1
    return 0
