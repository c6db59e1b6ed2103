"""The GradScaler and other-optimizer rows of ``gpu_report.py`` as a table of candidates.

Each :class:`Candidate` names the optimizer a row measures, the provider it is reported as,
and the constructor and keyword arguments that build it. Several candidates may share a
provider (fasthist's Adagrad with ``fused=True``, else ``foreach=True``): they are tried in
table order on two small tensors (:func:`probe`), and the first that runs is measured.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import time_model
import torch
from harness import DTYPES, GPU_SETS, free_memory, make_params, measure, scaled_step, set_size, step_bytes, sync

__all__ = [
    "ADABELIEF_PKG_MAX_TENSORS",
    "CANDIDATES",
    "OTHER_OPTIMIZERS",
    "Candidate",
    "CandidateRows",
    "error_line",
    "plan_candidates",
    "probe",
]

OTHER_OPTIMIZERS = ("rmsprop", "adagrad", "adabelief")
ADABELIEF_PKG_MAX_TENSORS = 500  # the package steps tensor by tensor in Python


@dataclass(frozen=True)
class Candidate:
    """``constructor(params, **kwargs)`` measured as ``provider`` in ``optimizer``'s rows;
    with ``scaler``, driven by a ``GradScaler``; skipped on sets of more than
    ``max_tensors`` tensors."""

    optimizer: str
    provider: str
    constructor: str  # dotted: "torch.optim.Adam", "fasthist.Adagrad", ...
    kwargs: dict[str, Any] = field(default_factory=dict)
    scaler: bool = False
    max_tensors: int | None = None
    note: str = ""

    @property
    def call(self) -> str:
        """The constructor call, as the report prints it."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.constructor}({args})" + (f" ({self.note})" if self.note else "")

    def resolve(self) -> Any:
        """The constructor (importing its module; raises when that fails)."""
        module, name = self.constructor.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    def factory(self, params: list[torch.Tensor]) -> object:
        # stdout swallowed: adabelief_pytorch prints its settings even with print_change_log=False
        with contextlib.redirect_stdout(io.StringIO()):
            return self.resolve()(params, **self.kwargs)


#: In the order the rows are tried and measured.
CANDIDATES = (
    Candidate("adam", "torch_fused+scaler", "torch.optim.Adam", {"fused": True}, scaler=True),
    Candidate("adam", "fasthist_track+scaler", "fasthist.Adam", {"fused": True, "track": True}, scaler=True),
    Candidate("rmsprop", "torch_foreach", "torch.optim.RMSprop", {"foreach": True}),
    Candidate("rmsprop", "fasthist_notrack", "fasthist.RMSprop", {"foreach": True, "track": False}),
    Candidate("rmsprop", "fasthist_track", "fasthist.RMSprop", {"foreach": True, "track": True}),
    Candidate("adagrad", "torch_fused", "torch.optim.Adagrad", {"fused": True}),
    Candidate("adagrad", "torch_foreach", "torch.optim.Adagrad", {"foreach": True}),
    Candidate("adagrad", "fasthist_notrack", "fasthist.Adagrad", {"fused": True, "track": False}),
    Candidate("adagrad", "fasthist_notrack", "fasthist.Adagrad", {"foreach": True, "track": False}),
    Candidate("adagrad", "fasthist_track", "fasthist.Adagrad", {"fused": True, "track": True}),
    Candidate("adagrad", "fasthist_track", "fasthist.Adagrad", {"foreach": True, "track": True}),
    Candidate(
        "adabelief",
        "adabelief_pytorch",
        "adabelief_pytorch.AdaBelief",
        {"print_change_log": False},
        max_tensors=ADABELIEF_PKG_MAX_TENSORS,
    ),
    Candidate(
        "adabelief",
        "torch_adam_fused",
        "torch.optim.Adam",
        {"fused": True},
        note="nearest fused baseline, not AdaBelief",
    ),
    Candidate("adabelief", "fasthist_notrack", "fasthist.AdaBelief", {"track": False}),
    Candidate("adabelief", "fasthist_track", "fasthist.AdaBelief", {"track": True}),
)


def _importable(c: Candidate) -> bool:
    try:
        c.resolve()
    except Exception:  # ImportError, or the package's own imports (tabulate, colorama) missing
        return False
    return True


def plan_candidates(
    scaler_sets: Sequence[str],
    scaler_dtypes: Sequence[str],
    opt_sets: Sequence[str],
    opt_dtypes: Sequence[str],
    optimizers: Sequence[str],
) -> list[tuple[str, str, list[Candidate]]]:
    """(set, dtype, candidates) of the GradScaler rows and of the other ``optimizers``'
    rows, in the order they run; candidates whose constructor does not import are left out."""
    scaled = [c for c in CANDIDATES if c.scaler]
    others = [c for c in CANDIDATES if not c.scaler and c.optimizer in optimizers and _importable(c)]
    plan = []
    for s in GPU_SETS:
        for d in DTYPES:
            jobs = (scaled if s in scaler_sets and d in scaler_dtypes else []) + (
                others if s in opt_sets and d in opt_dtypes else []
            )
            if jobs:
                plan.append((s, d, jobs))
    return plan


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
        sync(device)
        if not all(bool(torch.isfinite(p).all()) for p in params):
            return "non-finite parameters after two steps on small tensors"
    except Exception as e:  # an unsupported dtype/device, a missing kernel, a compile error
        return error_line(e)
    return None


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters of it)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


# -- measuring the rows -------------------------------------------------------------------
class CandidateRows:
    """Measures the candidates of a plan (:func:`plan_candidates`) into ``rows``, each the
    median ms of ``steps`` steps after ``warmup``; what could not be measured goes into
    ``skipped`` with the reason: a failed probe, too many tensors, or the time budget (the
    elapsed time since ``t_start`` plus the row's :mod:`time_model` estimate over
    ``budget_s``). Probes and Triton compiles are remembered across sets."""

    def __init__(
        self,
        device: torch.device,
        shapes_of: Callable[[str], list[tuple[int, ...]]],
        steps: int,
        warmup: int,
        budget_s: float,
        t_start: float,
    ) -> None:
        self.device, self.shapes_of = device, shapes_of
        self.steps, self.warmup, self.budget_s, self.t_start = steps, warmup, budget_s, t_start
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.probes: dict[tuple, str | None] = {}
        self.compiled: set[tuple] = set()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def skip(self, s: str, d: str, optimizer: str, provider: str, reason: str) -> None:
        self.skipped.append({"set": s, "dtype": d, "optimizer": optimizer, "provider": provider, "reason": reason})
        print(f"  skip {optimizer}/{provider}: {reason}", flush=True)

    def measure_plan(self, plan: list[tuple[str, str, list[Candidate]]]) -> None:
        budget = self.budget_s
        for s, d, jobs in plan:
            shapes = self.shapes_of(s)
            by_name: dict[tuple[str, str], list[Candidate]] = {}
            for c in jobs:
                by_name.setdefault((c.optimizer, c.provider), []).append(c)
            print(f"set {s} {d} (GradScaler and other-optimizer rows): {len(shapes)} tensors", flush=True)
            if self.elapsed() > budget:
                for opt, prov in by_name:
                    self.skip(s, d, opt, prov, f"time budget: over --budget-s {budget:.0f} s before this set")
                continue
            chosen = [c for c in (self.choose(s, d, len(shapes), cands) for cands in by_name.values()) if c]
            if chosen:
                self.measure_set(s, d, shapes, chosen)

    def choose(self, s: str, d: str, tensors: int, cands: list[Candidate]) -> Candidate | None:
        """The first of ``cands`` (one provider) that runs on two small tensors, else None (skipped)."""
        budget = self.budget_s
        opt, prov, limit = cands[0].optimizer, cands[0].provider, cands[0].max_tensors
        if limit is not None and tensors > limit:
            self.skip(s, d, opt, prov, f"{tensors} tensors > {limit}: it steps tensor by tensor in Python")
            return None
        reasons = []
        for c in cands:
            key = (c.optimizer, c.call, c.scaler, d)
            if key not in self.probes and self.elapsed() + time_model.COMPILE_S > budget:
                reasons.append(f"time budget: no time left to try {c.call} (--budget-s {budget:.0f} s)")
                continue
            if key not in self.probes:
                self.probes[key] = probe(c, DTYPES[d], self.device)
            if self.probes[key] is None:
                if reasons:
                    print(f"  {opt}/{prov}: using {c.call} ({'; '.join(reasons)})", flush=True)
                return c
            reasons.append(f"{c.call} failed: {self.probes[key]}")
        self.skip(s, d, opt, prov, "; ".join(reasons))
        return None

    def measure_set(self, s: str, d: str, shapes: list, chosen: list[Candidate]) -> None:
        device = self.device
        numel_full, tensors_full = set_size(s)  # the estimate is for the real (H200) sets
        params = make_params(shapes, DTYPES[d], device)
        elem = params[0].element_size()
        for c in chosen:
            key = time_model.kernel_key(c.optimizer, c.provider, d, c.scaler)
            est = time_model.step_ms(c.optimizer, c.provider, numel_full, tensors_full, elem, c.scaler)
            est = (self.steps + self.warmup) * est / 1e3 + time_model.SETUP_S
            est += time_model.COMPILE_S if key is not None and key not in self.compiled else 0.0
            elapsed = self.elapsed()
            if elapsed + est > self.budget_s:
                reason = (
                    f"time budget: {elapsed:.0f} s elapsed + ~{est:.1f} s estimated > --budget-s {self.budget_s:.0f} s"
                )
                self.skip(s, d, c.optimizer, c.provider, reason)
                continue
            try:
                ms = measure(c.factory, params, self.steps, self.warmup, device, scaler=c.scaler)
            except Exception as e:
                free_memory(device)
                self.skip(s, d, c.optimizer, c.provider, error_line(e))
                continue
            if key is not None:
                self.compiled.add(key)
            gbps = step_bytes(params, c.optimizer, c.scaler) / (ms * 1e-3) / 1e9
            row = {"set": s, "dtype": d, "optimizer": c.optimizer, "provider": c.provider, "call": c.call}
            self.rows.append({**row, "ms": ms, "gbps": gbps})
            print(f"  {c.optimizer:<10}{c.provider:<23}{ms:>10.3f} ms   ({self.elapsed():.0f} s elapsed)", flush=True)
        del params
        free_memory(device)
