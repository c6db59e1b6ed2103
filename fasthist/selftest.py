"""A self-test of each Triton kernel specialisation on the device it is about to run on.

The first time the dispatcher (:mod:`fasthist.dispatch`) hands a tracked call to the
Triton backend, per process and per *specialisation* -- the optimizer's kernel, the
parameter dtype, the :class:`~fasthist.LogBins` layout, the launch shape and histogram
strategy (``fasthist.kernels.SHAPE``), the device, and the flags that change the compiled
code (every bool argument, which tensor arguments are given, and for every float whether it
is zero, negative or above 0.5: the kernels' constexprs read nothing finer, e.g. ``WD_MODE``,
``LERP_SMALL``) -- the kernel runs once on a synthetic call, beside the reference backend
(:data:`fasthist.backend.TORCH`) on the same device, with the call's own keyword arguments
(``grad_scale`` replaced by ones and ``found_inf`` by zeros of the same kind, so the step
is not skipped). The synthetic call has two tensors: one of ``SHAPE.chunk * k + B`` elements
(full chunks through the unmasked hot loop, and a partial last chunk), the other of a few
elements. Its ``B`` elements, at the start and again in the partial chunk, hold:

- per bin edge ``e`` of the layout, ``e`` and ``e`` ±1 ulp *of the histogrammed value*: the
  states are found by bisection on their bits, with zero gradients, so that the reference
  computes exactly that value (where the dtype and the optimizer can reach it: a bf16 state
  reaches few of them; :attr:`Result.edges` counts those reached);
- ±0, the smallest subnormals, the largest finite values, ±inf and NaN as gradients, zero and
  subnormal states.

What must agree (the tolerances the kernel tests argue for):

- the histogram, exactly: the kernel's counts against :func:`fasthist.reference.histogram.
  accumulate_` of the kernel's own histogrammed values (``decl.hist_inputs`` of its states:
  the bins are then compared on the very floats the kernel binned);
- the update: parameters, gradients, states within 2 ulp of the larger of the reference's
  value, its change and the previous value (in the tensor's dtype), step counts exactly.
  (The kernel tests assert bit-identity on the CPU against a reference with a correctly
  rounded square root; the reference backend uses torch's, which on the CPU can be 1 ulp
  off, so the self-test asks for the CUDA tolerance everywhere.) Non-finite values must be
  the same non-finite values. The reference of a complex call is torch's foreach form: the
  kernels step complex tensors as (re, im) pairs throughout, as torch's foreach and fused
  forms do, where its for-loop form adds the weight decay in complex arithmetic first
  (``inf * 0`` is NaN there, so on an infinite parameter torch's two forms differ).
  float16/bfloat16 tensors: the step counts only. On these
  inputs the kernel claims no tolerance against a torch update: it computes in float32,
  rounds each state once on store and divides by the stored state, where torch's per-op
  half arithmetic rounds after every op (eps=1e-8 is 0 in float16, squares overflow) and a
  float32 update divides by the unrounded state; the kernel tests compare halves on
  ordinary values only. Their histograms are checked exactly, like every dtype's.

On a mismatch the specialisation is tried again with the ``tl`` histogram strategy
(``fasthist.kernels.histogram_choice("tl")`` around it: that thread's launches only); if
that agrees, the calls of
that specialisation run with it; if not, the dispatcher turns the Triton backend down for
them and the next backend runs (the torch ops, or the compiled CPU passes on the CPU). Either
way one warning says what differed (which bins, kernel vs reference counts; which list,
how many elements, max ulp), and ``opt.backends()`` carries it as the reason.

Cost, once per specialisation per process: a launch of the kernel and of the reference on
about 2 × (``SHAPE.chunk`` + 3 × ``num_bins``) elements (~50k for the defaults) and 32
bisection steps of the reference on 3 × ``num_bins`` elements. Measured under the
interpreter (``TRITON_INTERPRET=1``, 2 busy CPU cores): about 3 s per specialisation for
the default bins (:attr:`Result.seconds`; ``fasthist check`` prints it). On a GPU an
estimate, not a measurement: the kernel's first compile (seconds, which happens anyway) plus
~100 small launches, tens of milliseconds.

Off: ``FASTHIST_SELFTEST=0`` (read at each new specialisation; what was tested before
stays decided). A compiled step self-tests where its operator runs the kernel
(:mod:`fasthist.compiled`), not while ``torch.compile`` traces; skipped, without caching,
while a CUDA graph is being captured (a CUDA-graphed step's warm-up runs it first), and for
untracked calls (no histogram). The ``tl`` retry and the ``tl`` runs change the strategy of their own
thread's launches only; two threads meeting a new specialisation at once may both
self-test it (the same verdict, cached twice).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import backend
from .bins import LogBins
from .declaration import OptimizerDecl
from .reference.histogram import accumulate_
from .reference.staleness import bin_staleness_, magnitudes_, staleness_target
from .target import HistTarget

__all__ = ["TL_NOTE", "Result", "Verdict", "check", "enabled", "histogram", "results", "self_test"]

#: ``Choice.reason`` of a Triton call whose specialisation runs with the ``tl`` strategy.
TL_NOTE = "self-test: shared histogram differed, runs with tl.histogram"

#: Largest distance, in ulp, of the update from the reference's (module docstring).
UPDATE_ULP = 2.0


class Result(NamedTuple):
    """One self-test run: ``ok`` when everything agreed; ``detail`` says what differed;
    ``edges`` is (bin-edge values reached, asked for); ``seconds`` its wall time;
    ``guard``: the shared-histogram guard's warnings raised while it ran (CUDA only);
    ``compared`` False when the synthetic call could not run (``detail`` says why: e.g.
    torch's reference refuses ``capturable=True`` on CPU tensors), which is no mismatch."""

    ok: bool
    detail: str
    edges: tuple[int, int]
    seconds: float
    guard: tuple[str, ...] = ()
    compared: bool = True


class Verdict(NamedTuple):
    """A specialisation's outcome: ``histogram`` is ``"auto"`` (as configured), ``"tl"``
    (retried with ``tl`` and agreed) or ``""`` (turned down: ``refusal`` says why)."""

    histogram: str
    refusal: str | None
    first: Result
    retry: Result | None


_VERDICTS: dict[tuple, Verdict] = {}


def enabled() -> bool:
    """Whether new specialisations are self-tested (``FASTHIST_SELFTEST`` is not ``0``)."""
    return os.environ.get("FASTHIST_SELFTEST", "1").strip() not in ("0", "false", "no", "off")


def results() -> dict[tuple, Verdict]:
    """Every specialisation self-tested in this process so far, by key (module docstring)."""
    return dict(_VERDICTS)


def _flag(value: Any) -> Any:
    """What of one keyword argument can change the compiled kernel (module docstring)."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, Tensor):
        return ("tensor", value.device.type, value.dtype)
    if isinstance(value, (int, float)):
        return (value == 0, value < 0, value > 0.5)
    return type(value).__name__


def key(
    decl: OptimizerDecl, device: torch.device, dtype: torch.dtype, bins: LogBins, kwargs: dict, staleness: bool = False
) -> tuple:
    """The specialisation of a call (module docstring); ``staleness``: its target has
    staleness windows (the kernel then bins both quantities, a specialisation of its own)."""
    shape = backend.kernels_module().SHAPE
    # runs at every step: the values only (a call site passes its keywords in one order),
    # the common bools and Nones without a call
    flags = tuple([v if v is None or v is True or v is False else _flag(v) for v in kwargs.values()])
    return (
        decl.name,
        dtype,
        bins,
        (shape.block, shape.iters, shape.num_warps, backend.kernels_module().current_histogram_choice()),
        device,
        flags,
        staleness,
    )


def _may_run(device: torch.device) -> bool:
    """Whether a new specialisation can be self-tested now (module docstring)."""
    if not enabled() or torch.compiler.is_compiling():
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def check(decl: OptimizerDecl, device: torch.device, lists: list[list[Tensor]], hist: Any, kwargs: dict) -> str | None:
    """For :mod:`fasthist.dispatch`, once Triton takes the call: None when it may run as
    configured, :data:`TL_NOTE` when it runs with ``tl`` (:func:`histogram`), else why the
    Triton backend is turned down. Self-tests each new specialisation of the call first.
    While ``torch.compile`` traces: None, without reading the verdicts (a traced read would
    be guarded on, and the step recompiled once the first verdict is in); the traced step
    runs the kernel through its operator, which calls this where the call runs
    (:mod:`fasthist.compiled`)."""
    if hist is None or torch.compiler.is_compiling():
        return None
    tl = False
    for dtype in {p.dtype for p in lists[0]}:
        staleness = hist.staleness is not None
        k = key(decl, device, dtype, hist.bins, kwargs, staleness)
        verdict = _VERDICTS.get(k)
        if verdict is None:
            if not _may_run(device):
                return None
            verdict = _VERDICTS[k] = _decide(decl, device, dtype, lists, hist.bins, kwargs, staleness)
        if verdict.refusal is not None:
            return verdict.refusal
        tl = tl or verdict.histogram == "tl"
    return TL_NOTE if tl else None


@contextlib.contextmanager
def histogram(reason: str | None) -> Iterator[None]:
    """Within the block, the kernels use the ``tl`` strategy when ``reason`` is
    :data:`TL_NOTE` (a Triton call whose self-test asked for it); else nothing changes."""
    if reason != TL_NOTE:
        yield
        return
    with backend.kernels_module().histogram_choice("tl"):  # this thread's launches only
        yield


def _decide(
    decl: OptimizerDecl,
    device: torch.device,
    dtype: torch.dtype,
    lists: list,
    bins: LogBins,
    kwargs: dict,
    staleness: bool = False,
) -> Verdict:
    """Self-test; on a mismatch retry with ``tl``; one warning when anything differed."""
    first = _attempt(decl, device, dtype, lists, bins, kwargs, staleness)
    if first.ok:
        return Verdict("auto", None, first, None)
    with histogram(TL_NOTE):
        retry = _attempt(decl, device, dtype, lists, bins, kwargs, staleness)
    what = f"the Triton {decl.name} kernel ({dtype}, {bins}{', staleness' if staleness else ''}, {device})"
    if retry.ok:
        outcome = "with tl.histogram it agreed: this specialisation runs with tl.histogram"
        verdict = Verdict("tl", None, first, retry)
    else:
        outcome = f"with tl.histogram too ({retry.detail}): it runs on another backend (see opt.backends())"
        verdict = Verdict("", f"self-test differed from the reference: {first.detail}", first, retry)
    warnings.warn(f"fasthist: self-test of {what} differed from the reference: {first.detail}; {outcome}", stacklevel=2)
    return verdict


def _attempt(*args: Any) -> Result:
    """:func:`self_test`, or a Result that says why the synthetic call could not run (the
    user's call then runs as chosen: if the kernel cannot run it either, it raises there)."""
    try:
        return self_test(*args)
    except Exception as e:  # noqa: BLE001 - anything: a self-test must never break a step
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return Result(True, f"not compared: {type(e).__name__}: {first}", (0, 0), 0.0, compared=False)


def self_test(
    decl: OptimizerDecl,
    device: torch.device,
    dtype: torch.dtype,
    like: list[list[Tensor]],
    bins: LogBins,
    kwargs: dict,
    staleness: bool = False,
) -> Result:
    """Run ``decl``'s Triton kernel and the reference backend on one synthetic call of
    ``dtype`` shaped like the lists ``like`` (which lists are empty, where the step counts
    live) and compare them (module docstring). With ``staleness`` the kernel bins both
    quantities, and its staleness windows are compared too, exactly, with the reference
    binning of its own gradients and second moments (:func:`_staleness_problems`). Needs the
    kernels importable."""
    t0 = time.perf_counter()
    kwargs = _safe_kwargs(kwargs)
    chunk = backend.kernels_module().SHAPE.chunk
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # numpy's on the special values are expected: dropped below
        reference = _reference_kwargs(decl, dtype, kwargs)
        states, edges = _edge_states(decl, device, dtype, like, bins, reference)
        ours = _synthetic(decl, device, dtype, like, states, chunk)
        theirs = [[t.clone() for t in lst] for lst in ours]
        before = [[t.clone() for t in lst] for lst in ours]
        hk = _target(bins, 2, device, staleness)
        backend.run(backend.TRITON, decl, ours, hk, kwargs)
        backend.run(backend.TORCH, decl, theirs, None, reference)
        problems = _histogram_problems(decl, ours, hk, kwargs) + _update_problems(decl, ours, theirs, before)
        if staleness:
            problems += _staleness_problems(decl, before, ours, hk, kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    ours_said = [w for w in caught if str(w.message).startswith("fasthist")]
    for w in ours_said:  # fasthist's own (the guard's) still reach the user
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    guard = tuple(str(w.message) for w in ours_said if "shared-memory histogram" in str(w.message))
    return Result(not problems, "; ".join(problems), edges, time.perf_counter() - t0, guard)


_HALF = (torch.float16, torch.bfloat16)


def _reference_kwargs(decl: OptimizerDecl, dtype: torch.dtype, kwargs: dict) -> dict:
    """The reference's arguments: the call's, except that a complex call runs torch's
    foreach form. The kernels step complex parameters as real pairs (``view_as_real``) from
    the start, as torch's foreach and fused forms do; its for-loop form applies weight decay
    in complex arithmetic first, where ``grad + wd * p`` of an infinite ``p`` gives NaN in the
    other component (``inf * 0``), so on the self-test's special values the for-loop form
    and the foreach form of the same torch differ."""
    if dtype.is_complex and "foreach" in decl.bools and not kwargs.get("fused"):
        return {**kwargs, "foreach": True}
    return kwargs


def _safe_kwargs(kwargs: dict) -> dict:
    """The call's arguments with a ``grad_scale`` of ones and a ``found_inf`` of zeros: the
    same flags, a step that is not skipped."""
    out = dict(kwargs)
    if isinstance(out.get("grad_scale"), Tensor):
        out["grad_scale"] = torch.ones_like(out["grad_scale"])
    if isinstance(out.get("found_inf"), Tensor):
        out["found_inf"] = torch.zeros_like(out["found_inf"])
    return out


def _target(bins: LogBins, n: int, device: torch.device, staleness: bool = False) -> HistTarget:
    z = torch.zeros(n, bins.num_bins, dtype=torch.int64, device=device)
    windows = (z.clone(), z.clone()) if staleness else None
    return HistTarget(bins, z, z.clone(), torch.arange(n, device=device), staleness=windows)


def _as(values: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``values`` in ``dtype``; complex dtypes take consecutive pairs as (re, im)."""
    if dtype.is_complex:
        return torch.view_as_complex(values.reshape(-1, 2).contiguous()).to(dtype)
    return values.to(dtype)


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1)


def _call(like: list[list[Tensor]], columns: list[list[Tensor]]) -> list[list[Tensor]]:
    """Lists shaped like ``like`` (an empty list stays empty), tensor ``i`` of list ``k``
    being ``columns[i][k]`` for the tensor lists and a zero step count like ``like``'s."""
    steps = like[-1][0]
    out: list[list[Tensor]] = []
    for k, lst in enumerate(like[:-1]):
        out.append([col[k] for col in columns] if lst else [])
    out.append([torch.zeros_like(steps) for _ in columns])
    return out


def _hist_values(decl: OptimizerDecl, lists: list[list[Tensor]], kwargs: dict) -> Tensor:
    """The histogrammed float32 values of the first tensor of ``lists`` after its update
    (:mod:`fasthist.declaration`: ``sqrt(v) / c`` or ``v * c``, correctly rounded)."""
    values, scale, _ = decl.hist_inputs(lists, kwargs)
    x = _real(values[0]).float()
    if decl.sqrt:
        x = x.double().sqrt().float()  # float64 sqrt rounds to float32 correctly
    c = scale[0] if isinstance(scale, Tensor) else torch.tensor(scale[0])
    c = c.to(device=x.device, dtype=torch.float32)
    return x * c if decl.reciprocal else x / c


def _edge_targets(bins: LogBins) -> Tensor:
    """float32 values every bin edge and one ulp each side of it."""
    edges = bins.edges.to(torch.float32)
    down = torch.nextafter(edges, torch.zeros_like(edges))
    up = torch.nextafter(edges, torch.full_like(edges, float("inf")))
    return torch.stack([down, edges, up], dim=1).reshape(-1)


def _edge_states(
    decl: OptimizerDecl, device: torch.device, dtype: torch.dtype, like: list, bins: LogBins, kwargs: dict
) -> tuple[Tensor, tuple[int, int]]:
    """float32 states (every state list the same) whose reference update, from zero
    parameters and gradients, histograms the values of :func:`_edge_targets`: the smallest
    float bits with a value at least the target, by bisection (the value grows with the
    state); and (targets reached exactly, targets)."""
    targets = _edge_targets(bins).to(device)
    if targets.numel() % 2:
        targets = torch.cat([targets, targets[-1:]])
    lo = torch.zeros(targets.shape, dtype=torch.int64, device=device)
    hi = torch.full(targets.shape, 0x7F800000, dtype=torch.int64, device=device)

    def value(bits: Tensor) -> Tensor:
        s = bits.to(torch.int32).view(torch.float32)
        zero = torch.zeros_like(s)
        lists = _call(like, [[_as(zero, dtype), _as(zero, dtype)] + [_as(s, dtype)] * (len(like) - 3)])
        lists = [[t.clone() for t in lst] for lst in lists]
        backend.run(backend.TORCH, decl, lists, None, kwargs)
        return _hist_values(decl, lists, kwargs)

    for _ in range(32):
        mid = (lo + hi) // 2
        high_enough = value(mid) >= targets
        hi = torch.where(high_enough, mid, hi)
        lo = torch.where(high_enough, lo, mid + 1)
    reached = int((value(hi) == targets).sum())
    return hi.to(torch.int32).view(torch.float32), (reached, targets.numel())


def _specials(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(params, grads, states) float32: every special gradient against every special state,
    then special parameters; the values as ``dtype`` holds them (its subnormals, its max)."""
    fi = torch.finfo(dtype.to_real() if dtype.is_complex else dtype)
    sub, tiny, big, inf = fi.tiny * fi.eps, fi.tiny, fi.max, float("inf")
    grads = torch.tensor(
        [0.0, -0.0, sub, -sub, 3 * sub, tiny, -tiny, big, -big, inf, -inf, float("nan"), 1.0, -1.0, 1e-20, 3e-3]
    )
    states = torch.tensor([0.0, sub, 5 * sub, tiny, 1.0, big, inf, 1e-30])
    g = grads.repeat_interleave(len(states))
    s = states.repeat(len(grads))
    p = torch.ones_like(g)
    p_special = torch.tensor([0.0, -0.0, sub, -big, inf, float("nan"), -inf, 2.0])
    p = torch.cat([p, p_special])
    g = torch.cat([g, torch.full_like(p_special, 0.5)])
    s = torch.cat([s, torch.ones_like(p_special)])
    return p, g, s


def _synthetic(
    decl: OptimizerDecl, device: torch.device, dtype: torch.dtype, like: list, edge_states: Tensor, chunk: int
) -> list[list[Tensor]]:
    """The self-test's call: a long tensor whose block of edge and special elements sits at
    the start (a full chunk) and again in its partial last chunk, random elements between;
    and a short tensor of special elements."""
    n_edges = edge_states.numel()
    sp, sg, ss = (t.to(device) for t in _specials(dtype))
    zero = torch.zeros(n_edges, device=device)
    block = [torch.cat([zero, sp]), torch.cat([zero, sg]), torch.cat([edge_states, ss])]
    b = block[0].numel()
    if b % 2:
        block = [torch.cat([t, t[-1:]]) for t in block]
        b += 1
    length = -(-b // chunk) * chunk + b
    length += 2 if length % chunk == 0 else 0
    gen = torch.Generator().manual_seed(0)
    fill = [
        torch.randn(length, generator=gen),
        torch.randn(length, generator=gen) * 10 ** (torch.rand(length, generator=gen) * 10 - 8),
        torch.randn(length, generator=gen).abs() * 10 ** (torch.rand(length, generator=gen) * 10 - 10),
    ]
    long = []
    for t, f in zip(block, fill, strict=True):
        f = f.to(device)
        f[:b], f[length - b :] = t, t
        long.append(f)
    short = [t[n_edges : n_edges + 6] for t in block]
    columns = []
    for parts in (long, short):
        p, g, s = (_as(t, dtype) for t in parts)
        columns.append([p, g] + [s.clone() for _ in range(len(like) - 3)])
    return [[t.clone() for t in lst] for lst in _call(like, columns)]


_BIN_NAMES = {0: "zero", 1: "below"}


def _histogram_problems(decl: OptimizerDecl, ours: list, hk: HistTarget, kwargs: dict) -> list[str]:
    """The kernel's windows against the reference binning of its own values, exactly."""
    oracle = _target(hk.bins, hk.step.shape[0], hk.step.device)
    values, scale, found_inf = decl.hist_inputs(ours, kwargs)
    accumulate_(oracle, values, scale, found_inf, sqrt=decl.sqrt, reciprocal=decl.reciprocal)
    return _window_problems("", (hk.step, hk.total), (oracle.step, oracle.total), hk.bins)


def _staleness_problems(decl: OptimizerDecl, before: list, ours: list, hk: HistTarget, kwargs: dict) -> list[str]:
    """The kernel's staleness windows against the reference binning (:mod:`.reference.staleness`)
    of its own inputs and results: ``|g|`` from the gradients and parameters ``before`` the
    call, as the fused kernel forms ``g`` (float32, ``fma`` for coupled decay: the fused
    step's math, ``fused=True``), over the √v̂ values of its updated state ``ours``."""
    assert hk.staleness is not None
    oracle = _target(hk.bins, hk.step.shape[0], hk.step.device, staleness=True)
    fused = {**kwargs, "fused": True}
    target = staleness_target(oracle)
    bin_staleness_(target, decl, magnitudes_(target, decl.entering_grads(before, fused)), ours, fused)
    return _window_problems("staleness ", hk.staleness, oracle.staleness, hk.bins)


def _window_problems(what: str, got_windows: tuple, want_windows: tuple, bins: LogBins) -> list[str]:
    """What differs between two (step, total) window pairs, named by bin."""
    names = {**_BIN_NAMES, bins.above: "above", bins.nonfinite: "non-finite"}
    problems = []
    for window, got, want in zip(("step", "total"), got_windows, want_windows, strict=True):
        got, want = got.cpu(), want.cpu()
        bad = (got != want).nonzero().tolist()
        if bad:
            shown = ", ".join(
                f"tensor {t} bin {b}{' (' + names[b] + ')' if b in names else ''}: {got[t, b]} vs {want[t, b]}"
                for t, b in bad[:4]
            )
            more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
            problems.append(f"{what}{window} histogram: {len(bad)} bins differ ({shown}{more}; kernel vs reference)")
    return problems


_MANTISSA = {torch.float32: (24, -149), torch.bfloat16: (8, -133), torch.float16: (11, -24)}


def _ulps(a: Tensor, b: Tensor, prev: Tensor) -> Tensor:
    """|a - b| in ulp of ``max(|b|, |b - prev|, |prev|)`` in their dtype (float64); inf where
    one is non-finite and the other is not the same non-finite value; 0 for two NaNs."""
    dtype = a.dtype.to_real() if a.is_complex() else a.dtype
    bits, tiny = _MANTISSA[dtype]
    a, b, prev = (_real(t).double() for t in (a, b, prev))
    scale = torch.maximum(torch.maximum(b.abs(), (b - prev).abs()), prev.abs())
    _, e = torch.frexp(scale.nan_to_num(posinf=0.0))
    ulp = torch.ldexp(torch.ones_like(scale), torch.clamp(e - bits, min=tiny))
    dist = ((a - b).abs() / ulp).nan_to_num(nan=0.0, posinf=0.0)
    finite = a.isfinite() & b.isfinite()
    same_special = (a == b) | (a.isnan() & b.isnan())
    return torch.where(finite, dist, torch.where(same_special, 0.0, float("inf")))


def _update_problems(decl: OptimizerDecl, ours: list, theirs: list, before: list) -> list[str]:
    """Each list of the kernel's call against the reference's: step counts exactly, the
    rest within :data:`UPDATE_ULP` (:func:`_ulps`)."""
    problems = []
    for name, a_list, b_list, p_list in zip(decl.lists, ours, theirs, before, strict=True):
        if name == "state_steps":
            if any(float(a) != float(b) for a, b in zip(a_list, b_list, strict=True)):
                problems.append("state_steps differ")
            continue
        dist = [_ulps(a, b, p) for a, b, p in zip(a_list, b_list, p_list, strict=True) if a.dtype not in _HALF]
        if not dist:
            continue
        d = torch.cat(dist)
        bad = d > UPDATE_ULP
        if bad.any():
            worst = float(d.max())
            shown = "a non-finite mismatch" if worst == float("inf") else f"max {worst:.1f} ulp"
            problems.append(f"{name}: {int(bad.sum())} elements beyond {UPDATE_ULP:g} ulp ({shown})")
    return problems
