"""The compiled CPU histogram pass (fasthist/csrc) against the torch-op path it replaces
(:func:`fasthist.reference.histogram.accumulate_`), which stays the oracle: every count
equal, both windows.

The rest of the suite runs with the compiled pass on wherever it builds, so every existing
exactness test (kernels against the reference, optimizers against their formulas) covers
it too; this file adds the shapes and values that stress its own work split.
"""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch
from _cpu_helpers import compiled_histogram_, cpu_backend
from _optim_db import config_cases, grads_at

import fasthist
import fasthist.dispatch
from fasthist import LogBins, csrc
from fasthist.adam import ADAM
from fasthist.csrc import library
from fasthist.reference.histogram import accumulate_
from fasthist.target import HistTarget

pytestmark = [
    pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler"),
    # the torch-op path takes sqrt of the negative values on purpose (they bin as NaN)
    pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning"),
]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_builds_here():
    """Where a compiler exists (CI has gcc), the kernel builds and loads: nothing else in
    this file would fail if it silently fell back to torch ops."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert csrc.available(), csrc.library_path()


def special_values(n: int, seed: int) -> torch.Tensor:
    """~30 decades of magnitudes, both signs, and every bin edge case: ±0, subnormals,
    exact powers of two (bin edges), the range ends, float32's extremes, inf, NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(n, generator=g) * 60 - 40)
    x = x.float()
    edges = [0.0, -0.0, 1e-45, 1e-40, 2.0**-126, 2.0**-67, 2.0**-67 * (1 - 2**-24), 2.0**14, 2.0**14 * (1 - 2**-24)]
    edges += [1.0, 2.0**-30, 3.4028235e38, math.inf, -math.inf, math.nan, -1.0, -(2.0**-67)]
    k = min(n, len(edges))
    x[:k] = torch.tensor(edges[:k])
    return x


def run_both(bins, values, scale, found_inf=None, sqrt=True, rows=None, reciprocal=False):
    """(step, total) after one call, compiled pass and torch ops, from the same starting windows."""
    n = len(values)
    rows = torch.randperm(n + 3)[:n] if rows is None else rows
    start = torch.randint(0, 100, (2, n + 3, bins.num_bins), dtype=torch.int64)
    out = []
    for accumulate in (compiled_histogram_, accumulate_):
        target = HistTarget(bins, start[0].clone(), start[1].clone(), rows)
        accumulate(target, values, scale, found_inf, sqrt=sqrt, reciprocal=reciprocal)
        out.append((target.step, target.total))
    return out


# Sizes: empties between tensors; 1 and 3 elements (shorter than a vector, than the
# 4-way interleave); 1023/1025 around a block; 70,001 and 200,003 so that two and three
# threads cut tensors mid-way (the work split starts at 65,536 elements); many small ones.
SIZE_SETS = {
    "mixed": [0, 1, 3, 1023, 0, 1025, 70_001, 5, 200_003, 0],
    "one_big": [300_007],
    "many_small": [int(s) for s in torch.randint(1, 3000, (300,), generator=torch.Generator().manual_seed(1))],
    "empty": [0, 0],
}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("sizes", list(SIZE_SETS), ids=str)
@pytest.mark.parametrize("sqrt", [True, False])
@pytest.mark.parametrize("scale_kind", ["ones", "below_one", "above_one", "tensor"])
def test_matches_torch_ops(threads, sizes, sqrt, scale_kind):
    torch.set_num_threads(threads)
    sizes = SIZE_SETS[sizes]
    values = [special_values(n, seed=i) for i, n in enumerate(sizes)]
    g = torch.Generator().manual_seed(7)
    scale = {
        "ones": [1.0] * len(sizes),
        "below_one": (torch.rand(len(sizes), generator=g, dtype=torch.float64) * 0.99 + 0.01).tolist(),
        "above_one": (10.0 ** (torch.rand(len(sizes), generator=g, dtype=torch.float64) * 12)).tolist(),
        "tensor": torch.rand(len(sizes), generator=g) + 0.5,  # float32 on the device: capturable steps
    }[scale_kind]
    (s1, t1), (s0, t0) = run_both(LogBins(), values, scale, sqrt=sqrt)
    assert torch.equal(s1, s0)
    assert torch.equal(t1, t0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.complex64, torch.float64])
@pytest.mark.parametrize("bins", [LogBins(), LogBins(-126, 128, 0), LogBins(-20, 3, 10)], ids=repr)
def test_dtypes_and_layouts(dtype, bins):
    """Every parameter dtype (bf16/fp16 widen exactly; complex is binned per component;
    float64 stays on the torch-op path, which rounds it), the widest and the finest layouts."""
    torch.set_num_threads(2)
    values = [special_values(n, seed=n).to(dtype) for n in (100_000, 17, 40_000)]
    values.append(special_values(2 * 31 * 7, seed=3).reshape(31, 14)[:, ::2])  # not contiguous
    if dtype == torch.float64:
        rows = torch.zeros(4, bins.num_bins, dtype=torch.int64)
        target = HistTarget(bins, rows, rows.clone(), torch.arange(4))
        lists = [values, values, values, values, [], [torch.tensor(1.0)] * 4]
        choice = fasthist.dispatch.choose(ADAM, torch.device("cpu"), lists, target, {})
        assert choice.backend == "torch" and "float64" in choice.reason, choice
        return
    (s1, t1), (s0, t0) = run_both(bins, values, [0.9, 1.0, 0.25, 1.0])
    assert torch.equal(s1, s0)
    assert torch.equal(t1, t0)


@pytest.mark.parametrize("skip", [0.0, 1.0])
def test_found_inf(skip):
    """A step skipped by a GradScaler (found_inf = 1) leaves both windows as they were."""
    values = [special_values(n, seed=n) for n in (5000, 80_000)]
    found_inf = torch.tensor([skip])
    (s1, t1), (s0, t0) = run_both(LogBins(), values, [0.5, 1.0], found_inf)
    assert torch.equal(s1, s0)
    assert torch.equal(t1, t0)


def test_unavailable_warns_once_and_falls_back(monkeypatch):
    """No compiler (or a failed build): the dispatcher runs the torch-op path, with one
    warning, and says why in ``opt.backends()``."""

    def fail(directory):
        raise RuntimeError("the compiler failed (exit 1)")

    monkeypatch.setattr(library, "_ops", None)
    monkeypatch.setattr(library, "_error", None)
    monkeypatch.setattr(library, "_installed", lambda: None)
    monkeypatch.setattr(library._build, "build", fail)
    bins = LogBins()
    p = torch.zeros(10, requires_grad=True)
    opt = fasthist.Adam([p], bins=bins)
    p.grad = torch.ones(10)
    with pytest.warns(RuntimeWarning, match="compiled CPU histogram is unavailable.*compiler failed"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    (choice,) = opt.backends().values()
    assert choice.backend == "torch" and "compiled CPU library did not load" in choice.reason
    assert opt.histogram(p).count == 10
    assert opt.histogram(p, window="total").count == 20


def _train(info, config, on, steps=4):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in [(100, 300), (7,), (70_001,), (0,), (3, 5)]]
    opt = info.cls(params, **config)
    for step in range(steps):
        for p, gr in zip(params, grads_at(step, params), strict=True):
            p.grad = gr
        with fasthist.backend.use(cpu_backend(on)):
            opt.step()
    ran = {c.backend for c in opt.backends().values()}
    assert ran == ({"fused_cpu"} if config.get("fused") else {"torch+cpu_histogram"}) if on else {"torch"}, ran
    return params, opt.histogram_rows("step").counts, opt.histogram_rows("total").counts


@pytest.mark.parametrize(("info", "config"), config_cases())
def test_optimizers_match_torch_ops(info, config):
    """Every optimizer and flag set of the shared table: the same parameters (the update
    is torch's either way) and the same histograms, with the kernel on and off."""
    torch.set_num_threads(2)
    p1, step1, total1 = _train(info, config, True)
    p0, step0, total0 = _train(info, config, False)
    for a, b in zip(p1, p0, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(step1, step0)
    assert torch.equal(total1, total0)
    assert int(step1.sum()) == sum(p.numel() for p in p1)


@pytest.mark.parametrize("sqrt", [True, False])
@pytest.mark.parametrize("scale_kind", ["below_one", "tiny", "tensor"])
def test_reciprocal_scales_match_torch_ops(sqrt, scale_kind):
    """``reciprocal=True`` (AdaBelief's multiplier): one IEEE multiply on both paths, and a
    nonzero value whose product underflows counted below range on both."""
    sizes = SIZE_SETS["mixed"]
    values = [special_values(n, seed=i) for i, n in enumerate(sizes)]
    g = torch.Generator().manual_seed(8)
    scale = {
        "below_one": (torch.rand(len(sizes), generator=g, dtype=torch.float64) * 0.99 + 0.01).tolist(),
        "tiny": [2.0**-100] * len(sizes),  # products of small values underflow
        "tensor": torch.rand(len(sizes), generator=g) + 0.5,
    }[scale_kind]
    (s1, t1), (s0, t0) = run_both(LogBins(), values, scale, sqrt=sqrt, reciprocal=True)
    assert torch.equal(s1, s0)
    assert torch.equal(t1, t0)
