"""The shared-memory histogram of the fused kernels, checked without a GPU.

On the GPU the kernels count every element with one ``red.shared`` into a per-program window
of shared-memory words (``fasthist.kernels._common``), code the interpreter cannot run. It
is checked here four ways:

- the hot loop's PTX word formula (``BinSpec.word_asm``), emulated instruction by instruction
  in numpy over float32 bit patterns, folds to exactly ``LogBins.index`` (every pattern with
  ``FASTHIST_EXHAUSTIVE=1``: all 2**32 of them, a few minutes);
- the interpreter runs the same words and fold through ``tl.histogram`` (the default there)
  and the ``tl.histogram`` fallback, both exactly equal to the reference backend;
- the guard, which reads the compiled PTX and TTGIR by structure, refuses hand-written PTX
  breaking each of its rules and real mutants of the kernels compiled for sm_90 (each of
  which the old barrier-counting guard accepted), and the runtime falls back with one short
  warning;
- compiled for sm_90 with the installed Triton, the guard accepts the real kernels (and
  ``bench/sass_report.py`` holds them to the cost targets: ``test_sass_report.py``).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from _kernel_helpers import DEVICE, INTERPRETING, ON_CPU, compile_without_a_gpu, on_triton, same  # noqa: E402

from fasthist.bins import LogBins  # noqa: E402
from fasthist.reference.adam import adam_reference  # noqa: E402
from fasthist.reference.rmsprop import rmsprop_reference  # noqa: E402
from fasthist.target import HistTarget  # noqa: E402

C = pytest.importorskip("fasthist.kernels._common")
from fasthist.kernels import adam as KA  # noqa: E402
from fasthist.kernels import rmsprop as KR  # noqa: E402
from fasthist.kernels._common import bin_index, smem_word  # noqa: E402
from fasthist.kernels._smem_guard import shared_bytes_needed  # noqa: E402

# window layouts (one word per key) and ones too wide for the window (one word per bin)
LAYOUTS = {
    "default": LogBins(),
    "widest": LogBins(-126, 128, 5),  # every normal binade: the window starts at key 31
    "coarse": LogBins(-20, 10, 2),
    "one-per-binade": LogBins(-60, 20, 0),
    "fine-narrow": LogBins(-40, 0, 6),  # 2**14 keys: not a window, words are bins
    # low key 1, the only layouts with it: key 0 (the zeros and the smallest subnormals) is
    # the below-range word itself, so only the bits tell a zero from a subnormal
    "low-key-1": LogBins(-126, 0, 0),
    "low-key-1-all-finite": LogBins(-126, 128, 0),  # nothing finite above the range either
    "top-binade": LogBins(127, 128, 4),  # the window's last keys: above range is empty
    "fine-high": LogBins(2, 10, 6),  # 64 bins per binade, a window because the keys start high
    "finest-lowest": LogBins(-126, -124, 10),  # 2**18 keys: words are bins, from the first normal
}


def target(n: int, bins: LogBins = LAYOUTS["default"]) -> HistTarget:
    z = torch.zeros(n, bins.num_bins, dtype=torch.int64, device=DEVICE)
    return HistTarget(bins, z, z.clone(), torch.arange(n - 1, -1, -1, device=DEVICE))


# -- the PTX word formula, emulated -------------------------------------------------------
def run_word_asm(asm: str, bits: np.ndarray) -> np.ndarray:
    """``%fh_k`` after the PTX of ``BinSpec.word_asm`` on float32 bits ``$1`` (uint32).

    Registers are uint32 arrays; an immediate is read as PTX reads it, a 32-bit two's
    complement pattern (``-1`` is ``0xFFFFFFFF``), and the ``.s32`` operations view both
    operands as int32."""
    regs: dict[str, np.ndarray] = {"$1": bits.astype(np.uint32)}

    def val(tok: str) -> np.ndarray:
        if tok in regs:
            return regs[tok]
        return np.full(bits.shape, int(tok, 0) & 0xFFFFFFFF, dtype=np.uint32)

    for ins in filter(None, (s.strip() for s in asm.split(";"))):
        op, args = ins.split(None, 1)
        d, *src = (a.strip() for a in args.split(","))
        a, b = (val(s) for s in src)
        if op == "shl.b32":
            out = np.where(b < 32, a.astype(np.uint64) << (b.astype(np.uint64) & np.uint64(63)), 0).astype(np.uint32)
        elif op == "shr.u32":
            out = np.where(b < 32, a >> (b & np.uint32(31)), 0).astype(np.uint32)
        elif op == "min.u32":
            out = np.minimum(a, b)
        elif op == "sub.s32":  # wraps modulo 2**32, like the hardware
            out = (a.astype(np.int64) - b.view(np.int32).astype(np.int64)).astype(np.uint32)
        elif op == "max.s32":
            out = np.maximum(a.view(np.int32), b.view(np.int32)).view(np.uint32)
        else:
            raise AssertionError(f"word_asm uses {op}, which this emulator does not model")
        regs[d] = np.asarray(out, dtype=np.uint32)
    return regs["%fh_k"].view(np.int32)


def fold(words: np.ndarray, bins: LogBins) -> np.ndarray:
    """``_fold`` of the kernels: words past the log bins to above / non-finite."""
    inf_word = (0x7F800000 >> bins.shift) - bins.low_key + 2
    return np.where(words >= inf_word, bins.nonfinite, np.minimum(words, bins.above))


def check_words(bins: LogBins, bits: np.ndarray) -> None:
    spec = C.BinSpec(bins)
    words = run_word_asm(spec.word_asm(), bits)
    assert words.min() >= 0 and words.max() < spec.dump, "a word outside the window"
    expected = bins.index(torch.from_numpy(bits.view(np.float32))).numpy()
    bad = fold(words, bins) != expected
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(f"{bins}: bits {bits[i]:#010x} -> bin {fold(words, bins)[i]}, LogBins says {expected[i]}")


def boundary_patterns(bins: LogBins) -> np.ndarray:
    """Every bin edge of the bit layout (multiples of 2**shift), +-2 patterns, both signs,
    and the special values."""
    edges = np.arange(0, 1 << (32 - bins.shift), dtype=np.uint64) << np.uint64(bins.shift)
    near = (edges[:, None] + np.arange(-2, 3, dtype=np.int64)[None, :].astype(np.uint64)).ravel()
    specials = np.array([0, 1, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x00800000, 0x007FFFFF], np.uint64)
    return (np.concatenate([near, specials]) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


@pytest.mark.parametrize("name", [n for n, b in LAYOUTS.items() if C.BinSpec(b).window])
def test_word_asm_folds_to_logbins_index(name):
    bins = LAYOUTS[name]
    check_words(bins, boundary_patterns(bins))
    check_words(bins, edge_values(bins))
    rng = np.random.default_rng(0)
    check_words(bins, rng.integers(0, 1 << 32, size=1 << 21, dtype=np.uint64).astype(np.uint32))
    if os.environ.get("FASTHIST_EXHAUSTIVE") == "1":
        step = 1 << 26
        for start in range(0, 1 << 32, step):
            check_words(bins, np.arange(start, start + step, dtype=np.uint64).astype(np.uint32))


def edge_values(bins: LogBins) -> np.ndarray:
    """float32 bits of: ±0, subnormals (the smallest, the largest, a few between), every log
    bin edge ±1 ulp and the range's ends ±1 ulp (both signs), the largest finite, ±inf and
    NaNs (quiet, signalling, negative)."""
    keys = np.arange(bins.low_key, bins.low_key + bins.num_log_bins + 1, dtype=np.int64)
    edges = keys << bins.shift  # the bits of bins.edges (2**128 as inf's)
    assert np.array_equal(edges[:-1], np.float32(bins.edges[:-1].numpy()).view(np.uint32))
    near = (edges[:, None] + np.arange(-1, 2)[None, :]).ravel()
    sub = np.array([0, 1, 2, 3, 0x3FF, 0x400000, 0x7FFFFE, 0x7FFFFF, 0x800000, 0x800001])
    top = np.array([0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF])
    pos = np.concatenate([near, sub, top]) & 0x7FFFFFFF
    return np.concatenate([pos, pos | 0x80000000]).astype(np.uint32)


@triton.jit
def _bins_of(x_ptr, idx_ptr, word_ptr, n, SHIFT: tl.constexpr, LOW_KEY: tl.constexpr, ABOVE: tl.constexpr,
             NONFINITE: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live)
    tl.store(idx_ptr + offs, bin_index(x, SHIFT, LOW_KEY, ABOVE, NONFINITE), mask=live)
    tl.store(word_ptr + offs, smem_word(x, SHIFT, LOW_KEY, ABOVE, NONFINITE, WINDOW), mask=live)


@pytest.mark.skipif(not INTERPRETING, reason="the device functions, run on CPU tensors by the interpreter")
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_device_bin_formulas_match_logbins_index(name):
    """``bin_index`` (the ``tl.histogram`` strategy) and ``smem_word`` folded (the masked tail
    of the shared strategy and its interpreter twin) give exactly ``LogBins.index`` on the
    edge values of the layout and on every bin edge of the bit layout ±2 patterns."""
    bins = LAYOUTS[name]
    spec = C.BinSpec(bins)
    bits = np.concatenate([edge_values(bins), boundary_patterns(bins)])
    x = torch.from_numpy(bits.view(np.float32).copy())
    idx, words = torch.empty(x.shape, dtype=torch.int32), torch.empty(x.shape, dtype=torch.int32)
    block = 1 << 16
    grid = (triton.cdiv(x.numel(), block),)
    _bins_of[grid](x, idx, words, x.numel(), spec.shift, spec.low_key, spec.above, spec.nonfinite, spec.window, block)
    expected = bins.index(x)
    assert torch.equal(idx.long(), expected), f"bin_index: {int((idx.long() != expected).sum())} elements off"
    assert int(words.min()) >= 0 and int(words.max()) < spec.dump, "a word outside the histogram"
    folded = torch.from_numpy(fold(words.numpy(), bins)) if spec.window else words
    bad = folded.long() != expected
    assert not bad.any(), (
        f"smem_word: {int(bad.sum())} elements off, e.g. bits {int(bits[bad.numpy()][0]):#010x} -> "
        f"{int(folded[bad][0])}, LogBins says {int(expected[bad][0])}"
    )


def test_window_only_where_it_fits():
    for name, bins in LAYOUTS.items():
        spec = C.BinSpec(bins)
        keys = 1 << (31 - bins.shift)
        assert spec.window == (keys - bins.low_key + 2 < C.MAX_WINDOW), name
        assert spec.smem_bins > spec.dump and spec.smem_bins <= C.MAX_WINDOW, name
        if not spec.window:
            assert spec.dump == bins.num_bins and spec.word_asm() == "", name


# -- the interpreter: the shared strategy's twin and the fallback, exact ------------------
def _adam_case(n_steps: int, bins: LogBins) -> None:
    g = torch.Generator().manual_seed(3)
    shapes = [(C.SHAPE.chunk + 5,), (1000,), (1,), (0,), (7, 9)]
    params = [torch.randn(s, generator=g).to(DEVICE) for s in shapes]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    ref = [[t.clone() for t in lst] for lst in (params, *states)]
    steps_k = [torch.tensor(0.0) for _ in params]
    steps_r = [torch.tensor(0.0) for _ in params]
    hk, hr = target(len(params), bins), target(len(params), bins)
    kw = dict(amsgrad=False, has_complex=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8)
    kw.update(maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
    kw.update(grad_scale=None, found_inf=None, decoupled_weight_decay=False)
    for _ in range(n_steps):
        # spread over 20 decades, with exact zeros, so every part of the layout is hit
        grads = [
            torch.randn(p.shape, generator=g).to(DEVICE) * 10.0 ** torch.randint(-18, 3, p.shape, generator=g)
            for p in params
        ]
        for gr in grads[:1]:
            gr.view(-1)[:100] = 0.0
        on_triton(KA.adam_hist)(params, [x.clone() for x in grads], *states, [], steps_k, hist=hk, **kw)
        adam_reference(ref[0], [x.clone() for x in grads], *ref[1:], [], steps_r, hist=hr, **kw)
        assert torch.equal(hk.step, hr.step) and torch.equal(hk.total, hr.total)
        for a, b in zip(states[1], ref[2], strict=True):
            assert same(a, b)


@pytest.mark.skipif(not ON_CPU, reason="the interpreter's strategies")
@pytest.mark.parametrize("histogram", ["auto", "tl"])
@pytest.mark.parametrize("name", ["default", "coarse", "fine-narrow", "low-key-1"])
def test_interpreter_strategies_match_reference(histogram, name):
    """``auto`` runs the shared words' twin on the interpreter, ``tl`` the fallback."""
    C.configure(histogram=histogram)
    try:
        expected = C.HIST_WORDS if histogram == "auto" else C.HIST_TL
        assert C.histogram_strategy(None, (1,), (), {}, DEVICE, C.SHAPE.histogram) == expected
        _adam_case(2, LAYOUTS[name])
    finally:
        C.configure()


@pytest.mark.skipif(not ON_CPU, reason="the interpreter's strategies")
def test_interpreter_rmsprop_fallback_matches_reference():
    C.configure(histogram="tl")
    try:
        g = torch.Generator().manual_seed(4)
        params = [torch.randn(n, generator=g) for n in (C.SHAPE.chunk + 3, 17)]
        sq = [torch.zeros_like(p) for p in params]
        refs = [p.clone() for p in params], [t.clone() for t in sq]
        hk, hr = target(2), target(2)
        kw = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False)
        grads = [torch.randn(p.shape, generator=g) for p in params]
        on_triton(KR.rmsprop_hist)(params, grads, sq, [], [], [torch.tensor(0.0)] * 2, hist=hk, **kw)
        rmsprop_reference(refs[0], grads, refs[1], [], [], [torch.tensor(0.0)] * 2, hist=hr, **kw)
        assert torch.equal(hk.step, hr.step)
    finally:
        C.configure()


def test_configure_refuses_bad_shapes():
    with pytest.raises(ValueError, match="histogram"):
        C.configure(histogram="smem")
    with pytest.raises(ValueError, match="block"):
        C.configure(block=64, num_warps=4)  # fewer elements than threads: replicated lanes
    assert (C.SHAPE.block, C.SHAPE.iters, C.SHAPE.num_warps, C.SHAPE.histogram) == C.DEFAULT_SHAPE


# -- the guard ----------------------------------------------------------------------------
# The shape of a compiled HIST_SHARED kernel: zero, the never-taken reservation (Triton's own
# shared accesses and a barrier of its own), a barrier at the join, the increment loop, a
# barrier, the read-back. Hand-written PTX, so each rule can be broken on its own.
_ZERO = "{ .reg .b32 %fh_a; mov.u32 %fh_a, global_smem; st.shared.v4.u32 [%fh_a], {0, 0, 0, 0}; mov.u32 %r2, 0; }"
_INC = "{ .reg .b32 %fh_a; mov.u32 %fh_a, global_smem; red.shared.add.u32 [%fh_a], 1; mov.u32 %r8, 0; }"
_READ = "{ .reg .b32 %fh_a; mov.u32 %fh_a, global_smem; ld.shared.v4.u32 {%r3, %r4, %r5, %r6}, [%fh_a]; }"
GOOD_PTX = f"""
.extern .shared .align 16 .b8 global_smem[];
.visible .entry k(
\t.param .u64 k_param_0
)
{{
\tld.param.u64 %rd1, [k_param_0];
\t{_ZERO}
\t@%p1 bra $L__BB0_2;
\tmov.u32 %r10, %r11; // fasthist: reservation
\tst.shared.b32 [%r12], %r13;
\tbar.sync 0;
\tld.shared.b32 %r14, [%r12];
$L__BB0_2:
\tbar.sync 0;
$L__BB0_3:
\t{_INC}
\t@%p2 bra $L__BB0_3;
\tbar.sync 0;
\t{_READ}
\tret;
}}
"""
GOOD_TTGIR = """
#blocked = #ttg.blocked<{sizePerThread = [4], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>
%a = tt.elementwise_inline_asm "{ .reg .b32 %fh_a; red.shared.add.u32 [%fh_a], 1; }" {constraints = "=r,r"} %w : tensor<1024xi32, #blocked> -> tensor<1024xi32, #blocked>
"""
DUMP, SLAB = 6274, 128  # the default bins' window at 4 warps: 26,624 bytes of quads


def _problems(ptx: str = GOOD_PTX, ttgir: str = GOOD_TTGIR, shared: int = 32768) -> list[str]:
    return C.shared_histogram_problems(ptx, ttgir, shared, DUMP, SLAB)


def test_guard_reasons():
    assert _problems() == []
    assert shared_bytes_needed(DUMP, SLAB) == 26624
    # Triton's own shared memory outside the never-taken reservation: the histogram's words
    # could be overwritten (or overwrite it)
    foreign = GOOD_PTX.replace("$L__BB0_3:", "\tst.shared.b32 [%r15], %r13;\n$L__BB0_3:")
    assert _problems(foreign)[0].startswith("foreign shared access")
    generic = GOOD_PTX.replace("$L__BB0_3:", "\tst.u32 [%rd2], %r13;\n$L__BB0_3:")  # may address shared
    assert _problems(generic)[0].startswith("foreign shared access")
    assert _problems(shared=16384)[0].startswith("coverage")
    no_symbol = GOOD_PTX.replace("global_smem[]", "smem[]")
    assert "global_smem" in _problems(no_symbol)[0]
    no_red = GOOD_PTX.replace("red.shared.add.u32", "atom.global.add.u32")
    assert _problems(no_red)[0].startswith("declaration: no increment")
    no_mark = GOOD_PTX.replace("// fasthist: reservation", "")
    assert _problems(no_mark)[0].startswith("declaration")
    replicated = GOOD_TTGIR.replace("1024xi32", "64xi32")
    assert _problems(ttgir=replicated)[0].startswith("replicated increment")


@pytest.mark.parametrize(
    "barrier",
    ["$L__BB0_2:\n\tbar.sync 0;", "\t@%p2 bra $L__BB0_3;\n\tbar.sync 0;"],
    ids=["after-zeroing", "before-read-back"],
)
def test_guard_follows_paths_not_counts(barrier):
    """Either barrier of the histogram removed: the reservation's barrier keeps the count at
    two, but the path that skips the reservation crosses none. A barrier inside the
    reservation never runs, so removing it changes nothing."""
    mutant = GOOD_PTX.replace(barrier, barrier.replace("\tbar.sync 0;", ""))
    assert mutant.count("bar.sync") == 2
    assert _problems(mutant)[0].startswith("barriers")
    predicated = GOOD_PTX.replace(barrier, barrier.replace("\tbar.sync", "\t@%p3 bar.sync"))
    assert _problems(predicated)[0].startswith("barriers")
    assert _problems(GOOD_PTX.replace("\tbar.sync 0;\n\tld.shared.b32", "\tld.shared.b32")) == []


class _Compiled:
    def __init__(self, ptx: str, shared: int) -> None:
        self.asm = {"ptx": ptx, "ttgir": GOOD_TTGIR}
        self.metadata = type("M", (), {"shared": shared})()


class _FakeKernel:
    """Stands for a JITFunction: ``warmup`` returns what the compiler would have made."""

    def __init__(self, ptx: str) -> None:
        self.ptx, self.calls = ptx, []

    def warmup(self, *args, grid, **kwargs):
        self.calls.append(kwargs["HIST"])
        return _Compiled(self.ptx, 32768)


def test_strategy_checks_once_and_falls_back_with_one_warning():
    cuda = torch.device("cuda", 0)  # only its type is read: nothing runs
    args = (torch.zeros(4),)
    kw = {"BINS": C.BinLayout(**dict(C.NO_BINS, SMEM_BINS=8192, DUMP=DUMP, SLAB=SLAB)), "DTYPE": "fp32"}
    good = _FakeKernel(GOOD_PTX)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.histogram_strategy(good, (1,), args, kw, cuda) == C.HIST_SHARED
        assert C.histogram_strategy(good, (1,), args, kw, cuda) == C.HIST_SHARED
    assert good.calls == [C.HIST_SHARED]  # compiled and checked once, the kernel that launches
    # Triton's own code uses shared memory outside the reservation too
    bad = _FakeKernel(GOOD_PTX.replace("$L__BB0_3:", "\tst.shared.b32 [%r15], %r13;\n$L__BB0_3:"))
    with pytest.warns(UserWarning, match="falling back to tl.histogram") as caught:
        assert C.histogram_strategy(bad, (1,), args, kw, cuda) == C.HIST_TL
    assert len(caught) == 1 and "foreign shared access" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.histogram_strategy(bad, (1,), args, dict(kw, DTYPE="bf16"), cuda) == C.HIST_TL


_COMPILE_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import sys
sys.path.insert(0, "bench")
import sass_report as S
from fasthist.bins import LogBins
C = S.C
layout = C.bin_layout(C.BinSpec(LogBins()).kwargs(), C.SHAPE.num_warps)
for name in ("adamw", "adagrad"):
    (body, flags), _ = S.KERNELS[name]
    kw = C.constexprs(body, flags, S.tl.bfloat16, layout, hist=C.HIST_SHARED)
    real = S.compile_kernel(kw, 90, C.SHAPE.num_warps)
    problems = C.shared_histogram_problems(real.asm["ptx"], real.asm["ttgir"], real.metadata.shared, layout.DUMP, layout.SLAB)
    assert problems == [], (name, problems)
    ptx = real.asm["ptx"]
    per_thread = C.SHAPE.block // (32 * C.SHAPE.num_warps)
    # one shared increment per element a thread holds: in the full-chunk and the tail loop
    assert ptx.count("red.shared.add.u32") == 2 * per_thread, (name, ptx.count("red.shared.add.u32"))
    assert "shl.b32 %fh_b" in ptx  # the hot loop's PTX word formula is in
print("ok")
"""


def test_guard_accepts_the_compiled_kernels():
    """sm_90 compile with the installed Triton: the guard passes and every element of a
    block is counted once (one shared increment per element per loop)."""
    _in_root(_COMPILE_SCRIPT, timeout=600)


# Mutants of the real kernels, compiled for sm_90 in a fresh interpreter (no GPU needed): each
# is unsafe, each passes the guard that counted barriers and read a probe compile (checked
# here with that guard's own criteria: two bar.sync, no shared memory in the probe, a
# reservation of at least SMEM_BINS words), and the structural guard names the broken rule.
_MUTANT_SCRIPT = r"""
import os, shutil, sys, tempfile, warnings
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, "bench")
import torch
import sass_report as S
from fasthist.bins import LogBins
C = S.C

BEGIN_BARRIER = ("        tl.debug_barrier()\n    return acc", "    return acc")
END_BARRIER = ("    if HIST == 2 or HIST == 3:\n        tl.debug_barrier()\n", "    if HIST == 2 or HIST == 3:\n")
HOT_REDUCTION = ('_SMEM_WORD_POST, "=r,r", [bits]', '_SMEM_WORD_POST, "=r,r", [bits + tl.max(bits, 0)]')
MUTANTS = {  # name: (source edit of kernels/_histogram.py, launch changes, the rule it breaks)
    "none": (None, {}, None),
    "begin-barrier-removed": (BEGIN_BARRIER, {}, "barriers"),
    "end-barrier-removed": (END_BARRIER, {}, "barriers"),
    "reduction-in-hot-loop": (HOT_REDUCTION, {}, "foreign shared access"),
    "replicated-block": (None, {"BLOCK": 64}, "replicated increment"),
    "reservation-too-small": (None, {"SMEM_BINS": 4096}, "coverage"),
}


def mutant_kernels(name, edit):
    if edit is None:
        return S.K
    root = tempfile.mkdtemp()
    pkg = "mutant_" + name.replace("-", "_")
    shutil.copytree("kernels", os.path.join(root, pkg), ignore=shutil.ignore_patterns("__pycache__"))
    path = os.path.join(root, pkg, "_histogram.py")
    src = open(path).read()
    assert src.count(edit[0]) == 1, edit[0]
    open(path, "w").write(src.replace(edit[0], edit[1]))
    sys.path.insert(0, root)
    return __import__(pkg + ".adam")  # the package: its adam (BODY) and _common (the kernel)


class Compiled:  # what the runtime's warmup would return for this mutant
    def __init__(self, ck):
        self.ck = ck

    def warmup(self, *args, grid, **kwargs):
        return self.ck


for name, (edit, launch, rule) in MUTANTS.items():
    K = mutant_kernels(name, edit)
    layout = C.bin_layout(C.BinSpec(LogBins()).kwargs(), 4)
    layout = layout._replace(**{k: v for k, v in launch.items() if k in layout._fields})
    kw = C.constexprs(K.adam.BODY, S.KERNELS["adam"][0][1], S.tl.float32, layout)
    kw.update({k: v for k, v in launch.items() if k not in layout._fields}, ITERS=16)
    real = S.compile_kernel(dict(kw, HIST=C.HIST_SHARED), 90, 4, fn=K._common.fused_step_kernel)
    probe = S.compile_kernel(dict(kw, HIST=C.HIST_PROBE), 90, 4, fn=K._common.fused_step_kernel)
    ptx = real.asm["ptx"]
    counting_guard_accepts = (
        probe.metadata.shared == 0
        and real.metadata.shared >= 4 * layout.SMEM_BINS
        and ptx.count("bar.sync") >= 2
        and all(op in ptx for op in ("red.shared.add.u32", "ld.shared.v4.u32", "st.shared.v4.u32"))
    )
    assert counting_guard_accepts, name
    problems = C.shared_histogram_problems(ptx, real.asm["ttgir"], real.metadata.shared, layout.DUMP, layout.SLAB)
    print(name, problems)
    if rule is None:
        assert problems == [], problems
        continue
    assert [p.split(":")[0] for p in problems] == [rule], (name, problems)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = C.histogram_strategy(Compiled(real), (1,), (), dict(kw, MUTANT=name), torch.device("cuda", 0))
    assert choice == C.HIST_TL
    assert len(caught) == 1 and rule in str(caught[0].message) and len(str(caught[0].message)) < 400, caught
print("ok")
"""


def _in_root(script: str, timeout: int) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        compile_without_a_gpu(script, timeout=timeout)
    finally:
        os.chdir(cwd)


def test_guard_refuses_each_mutant_the_counting_guard_accepted():
    """Each barrier removed, a reduction in the hot loop (Triton's shared memory outside the
    reservation, in the real kernel only), a block smaller than the threads (every element
    counted twice), a reservation smaller than the words used: refused by name, and the
    runtime falls back with one short warning; the unmutated kernel passes."""
    _in_root(_MUTANT_SCRIPT, timeout=900)


_ONE_WARP_SCRIPT = r"""
import contextlib, io, os, sys, warnings
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, "bench")
import torch
import sass_report as S
from fasthist.bins import LogBins
C = S.C
(body, flags), _ = S.KERNELS["adam"]
kw = dict(C.constexprs(body, flags, S.tl.float32, C.bin_layout(C.BinSpec(LogBins(-8, 8, 2)).kwargs(), 1)), BLOCK=1024, ITERS=16)


class OneWarp:  # compiles for sm_90 where the runtime's warmup would compile for the device
    def warmup(self, *args, grid, **kwargs):
        return S.compile_kernel({k: v for k, v in kwargs.items() if k != "num_warps"}, 90, 1)


out = io.StringIO()
with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    choice = C.histogram_strategy(OneWarp(), (1,), (), dict(kw, num_warps=1), torch.device("cuda", 0))
assert choice == C.HIST_TL, choice
assert out.getvalue() == "", out.getvalue()[:2000]
assert len(caught) == 1, [str(w.message)[:300] for w in caught]
message = str(caught[0].message)
assert "compiling it failed" in message and "ptxas" in message.lower() and len(message) < 500, message
print(message)
print("ok")
"""


def test_a_shape_the_shared_path_cannot_take_falls_back_quietly():
    """One warp: the reservation's gather stays in registers, so no shared memory is
    declared and ptxas rejects the histogram's PTX, and a failing ptxas makes Triton print
    the whole PTX to stdout. The runtime falls back to ``tl.histogram`` with one warning of
    a line naming the error, and nothing reaches stdout. A small layout (64 bins): ptxas
    fails the same way for any, but takes 2 CPU minutes to fail with the default 2,596 bins (7.5
    minutes wall on a loaded 2-core machine, Triton 3.9), against a few seconds here."""
    _in_root(_ONE_WARP_SCRIPT, timeout=600)


# -- low-precision states round to nearest even, on the interpreter as on the GPU ---------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_states_round_to_nearest_even(dtype):
    """A bf16/fp16 step computes in float32 and rounds each stored state once, to nearest
    even (as the GPU's cvt.rn; the interpreter's own bf16 cast truncates, so the kernels
    round explicitly there): the states equal the float32 kernel's, run on the same
    (exactly upcast) inputs, rounded by torch."""
    g = torch.Generator().manual_seed(9)
    shapes = [(C.SHAPE.chunk + 3,), (300,), (5, 7)]
    params = [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes]
    grads = [
        torch.randn(s, generator=g).mul(10.0 ** torch.randint(-6, 2, s, generator=g)).to(DEVICE, dtype) for s in shapes
    ]
    m0 = [torch.randn(s, generator=g).mul(1e-2).to(DEVICE, dtype) for s in shapes]
    v0 = [torch.rand(s, generator=g).mul(1e-3).to(DEVICE, dtype) for s in shapes]
    vmax0 = [v.clone() for v in v0]
    kw = dict(amsgrad=True, has_complex=False, beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.1, eps=1e-6)
    kw.update(maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
    kw.update(grad_scale=None, found_inf=None, decoupled_weight_decay=True)
    low = [[t.clone() for t in lst] for lst in (params, grads, m0, v0, vmax0)]
    wide = [[t.float() for t in lst] for lst in (params, grads, m0, v0, vmax0)]
    on_triton(KA.adam_hist)(*low, [torch.tensor(0.0) for _ in shapes], hist=target(3), **kw)
    on_triton(KA.adam_hist)(*wide, [torch.tensor(0.0) for _ in shapes], hist=target(3), **kw)
    for name, k in (("exp_avg", 2), ("exp_avg_sq", 3), ("max_exp_avg_sq", 4)):
        for i, (a, b) in enumerate(zip(low[k], wide[k], strict=True)):
            assert same(a, b.to(dtype)), (
                f"{name}[{i}]: {int((a != b.to(dtype)).sum())} elements not rounded to nearest even"
            )


@pytest.mark.gpu
def test_gpu_shared_strategy_runs_and_matches_the_fallback():
    """On a GPU: the compiled kernels pass their check (no fallback warning), and the shared
    histogram counts exactly what the tl.histogram fallback and the reference count."""
    bins = LAYOUTS["default"]
    results = {}
    for histogram in ("auto", "tl"):
        C.configure(histogram=histogram)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                _adam_case(3, bins)  # exact against the reference backend every step
            g = torch.Generator().manual_seed(5)
            p = [torch.randn(C.SHAPE.chunk * 3 + 11, generator=g).to(DEVICE)]
            m, v = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])]
            h = target(1, bins)
            grads = [torch.randn(p[0].shape, generator=g).to(DEVICE)]
            kw = dict(amsgrad=False, has_complex=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.0, eps=1e-8)
            kw.update(maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
            kw.update(grad_scale=None, found_inf=None, decoupled_weight_decay=False)
            on_triton(KA.adam_hist)(p, grads, m, v, [], [torch.tensor(0.0)], hist=h, **kw)
            results[histogram] = h.step.clone()
        finally:
            C.configure()
    assert torch.equal(results["auto"], results["tl"])


def test_adabelief_quotient_underflow_is_below_range_as_in_the_reference():
    """(1 - beta2) * s_hat = v / c with c up to 1 / (1 - beta2): a subnormal nonzero v can
    divide to 0; like the reference, the kernel counts it below range, not as zero."""
    from fasthist.kernels import adabelief as KB

    from fasthist.reference.adabelief import adabelief_reference

    n = 64
    s0 = torch.full((n,), 1e-44, device=DEVICE)
    s0[:8] = 0.0  # true zeros stay zeros
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0, amsgrad=False)
    kw.update(weight_decouple=True, fixed_decay=False, rectify=False, degenerated_to_sgd=True)
    hists = []
    for fn in (on_triton(KB.adabelief_hist), adabelief_reference):
        p, g, m, s = (
            torch.ones(n, device=DEVICE),
            torch.zeros(n, device=DEVICE),
            torch.zeros(n, device=DEVICE),
            s0.clone(),
        )
        h = target(1)
        fn([p], [g], [m], [s], [], [torch.tensor(200.0)], hist=h, **kw)
        hists.append(h.step[0])
    bins = LAYOUTS["default"]
    assert int(hists[1][bins.ZERO]) == 8 and int(hists[1][bins.BELOW]) == n - 8  # the reference's rule
    assert torch.equal(hists[0], hists[1])
