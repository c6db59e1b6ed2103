"""The timing harness shared by ``bench_step.py`` and ``gpu_report.py``: parameter sets,
bytes per step, parameters with gradients, timing (CUDA events on a GPU) and the
device-to-device copy bandwidth that GB/s figures are compared with.

Reads the optimizers' declarations (:mod:`fasthist.catalog`) for the bytes a step moves, so
``gpu_report.py`` imports it only once it has found fasthist (in a bare checkout, too).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable

import torch

from fasthist.catalog import declarations

__all__ = [
    "ACCESSES",
    "DTYPES",
    "GPU_SETS",
    "copy_bandwidth",
    "dry_run_shapes",
    "free_memory",
    "gpu_param_shapes",
    "interleaved",
    "make_params",
    "measure",
    "param_shapes",
    "scaled_step",
    "set_size",
    "step_bytes",
    "sync",
    "time_steps",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_SETS = ("a", "b", "c")

#: Accesses per parameter element one step must make, with the default options and the
#: states in the parameter dtype: it reads p and g and writes p, and reads and writes each
#: state its declaration says the default options use (Adam: m and v, 7 in all).
ACCESSES = {name: 3 + 2 * len(decl.default_states) for name, decl in declarations().items()}


# -- parameter sets -----------------------------------------------------------------------
def gpu_param_shapes(name: str) -> list[tuple[int, ...]]:
    """The GPU sets.

    - ``a``: a 1.1B-parameter decoder in 201 tensors (TinyLlama-1.1B shapes: 22 layers,
      hidden 2048, MLP 5632, grouped KV 256, vocabulary 32000, untied head);
    - ``b``: GPT-2 small, 124M parameters in 148 tensors;
    - ``c``: 2,000 small tensors totalling 20M parameters (sizes 2k-18k, fixed seed).
    """
    if name == "a":
        h, f, kv, vocab = 2048, 5632, 256, 32000
        layer = [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f), (h,), (h,)]
        return [(vocab, h)] + layer * 22 + [(h,), (vocab, h)]
    if name == "b":
        d, vocab, ctx = 768, 50257, 1024
        layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
        return [(vocab, d), (ctx, d)] + layer * 12 + [(d,), (d,)]
    if name == "c":
        g = torch.Generator().manual_seed(0)
        sizes = torch.randint(2000, 18001, (2000,), generator=g)
        sizes = (sizes.double() * (20_000_000 / sizes.sum().item())).round().long()
        sizes[-1] += 20_000_000 - int(sizes.sum())
        return [(int(n),) for n in sizes]
    raise ValueError(f"unknown GPU parameter set {name!r}; expected 'a', 'b' or 'c'")


def dry_run_shapes(name: str) -> list[tuple[int, ...]]:
    """The GPU sets shrunk (same tensor counts for b and c), for ``gpu_report.py --dry-run`` on a CPU."""
    shapes = gpu_param_shapes(name)
    if name == "a":
        shapes = shapes[:20]
    return [tuple(max(1, d // (256 if name != "c" else 1000)) for d in s) for s in shapes]


def param_shapes(name: str) -> list[tuple[int, ...]]:
    """A set by name: ``a`` (12.6M parameters in 20 tensors: a few big matrices,
    bandwidth-bound), ``b`` (1,000 tensors of 1k-10k elements: launch- and
    Python-overhead-bound), or ``gpu_a``/``gpu_b``/``gpu_c`` (:func:`gpu_param_shapes`)."""
    if name == "a":
        return [(1024, 1024)] * 8 + [(4096,)] * 8 + [(512, 2048)] * 4
    if name == "b":
        g = torch.Generator().manual_seed(0)
        return [(int(n),) for n in torch.randint(1000, 10001, (1000,), generator=g)]
    if name.startswith("gpu_"):
        return gpu_param_shapes(name[4:])
    raise ValueError(f"unknown parameter set {name!r}; expected 'a', 'b', 'gpu_a', 'gpu_b' or 'gpu_c'")


def set_size(name: str) -> tuple[int, int]:
    """(parameters, tensors) of GPU set ``name``."""
    shapes = gpu_param_shapes(name)
    return sum(math.prod(s) for s in shapes), len(shapes)


def step_bytes(params: list[torch.Tensor], optimizer: str = "adam", scaler: bool = False) -> int:
    """Bytes one ``optimizer`` step must move (:data:`ACCESSES` per element); with a
    ``GradScaler`` one more read of every gradient (its inf/NaN check)."""
    k = ACCESSES[optimizer] + (1 if scaler else 0)
    return sum(k * p.numel() * p.element_size() for p in params)


def make_params(shapes, dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
    """Parameters of ``shapes`` (standard normal, drawn in float32 from a fixed seed) with
    gradients kept in ``.grad`` (normal, scale 1e-2)."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_()
        p.grad = (torch.randn(s, generator=gen, device=device, dtype=torch.float32) * 1e-2).to(dtype)
        params.append(p)
    return params


# -- timing -------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collects garbage and, on a GPU, returns cached blocks: between measurements."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    sync(device)
    ms = statistics.median(time_steps(lambda: dst.copy_(src), reps, device))
    return 2 * nbytes / (ms * 1e-3) / 1e9


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
    factory: Callable[[list[torch.Tensor]], object],
    params: list[torch.Tensor],
    steps: int,
    warmup: int,
    device: torch.device,
    scaler: bool = False,
) -> float:
    """Median ms of one step of the optimizer ``factory(params)`` builds; with ``scaler``,
    of ``scaler.step(opt); scaler.update()``."""
    opt = factory(params)
    step = scaled_step(opt, device) if scaler else opt.step
    for _ in range(warmup):  # lazy state, Triton compilation, table caches
        step()
    sync(device)
    ms = statistics.median(time_steps(step, steps, device))
    del opt, step
    free_memory(device)
    return ms


def interleaved(
    factories: dict[str, Callable[[list[torch.Tensor]], object]],
    shapes: list[tuple[int, ...]],
    steps: int,
    warmup: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ms of one step of each optimizer ``factories[name](params)`` builds, each on
    its own copy of the parameters, their steps interleaved (one step of each in turn): on
    a shared machine a slow spell then falls on all of them alike, and their ratios hold.
    ``clock=time.process_time`` counts the CPU time of all the process's threads instead
    (on the CPU: the work, whatever else the machine runs; not the wall time)."""
    opts = {name: make(make_params(shapes, torch.float32, device)) for name, make in factories.items()}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for i in range(warmup + steps):
        for name, opt in opts.items():
            sync(device)
            t0 = clock()
            opt.step()
            sync(device)
            ms = (clock() - t0) * 1e3
            if i >= warmup:
                times[name].append(ms)
    del opts
    free_memory(device)
    return {name: statistics.median(t) for name, t in times.items()}
