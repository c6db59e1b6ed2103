"""One optimizer step, per provider and parameter set (pytest-benchmark).

    python -m pytest bench/bench_step.py                        # measure (CPU or GPU)
    python -m pytest bench/bench_step.py --benchmark-disable     # smoke run (CI)
    python bench/bench_step.py [a b] [--steps 15]                # CPU: interleaved ratios
    python bench/bench_step.py a b --compiled --cpu-time         # compiled steps
    python bench/bench_step.py a b --compiled --groups "adam compiled" --cpu-time --threads 1

On a GPU, ``test_step`` times the Adam providers (``providers.ADAM_PROVIDERS``):
torch.optim.Adam foreach / fused, fasthist.Adam with track=False / True (``fused=True``),
and ``torch_fused+hist`` (torch's fused Adam followed by the leanest per-tensor torch-op
histogram, see ``providers.py``). On the CPU, ``test_cpu_step`` times every optimizer
against its torch (or adabelief-pytorch) counterpart in two groups, ``default`` (both as
``Cls(params)`` builds them) and ``fused`` (``fused=True`` on both, where torch has a fused
CPU step): the baseline, fasthist track=False and tracked; pytest-benchmark prints each
time's ratio to the fastest of its group in parentheses. Sets
(``harness.param_shapes``): (a) 12.6M parameters in 20 tensors, (b) 1,000 tensors of
1k-10k elements; with CUDA also the GPU sets ``gpu_a`` (1.1B in 201 tensors), ``gpu_b``
(GPT-2 small), ``gpu_c`` (2,000 tensors, 20M). Compare ratios within one run, not absolute
times; ``gpu_report.py`` is the GPU measurement of record.
"""

from __future__ import annotations

import pytest
import torch
from harness import interleaved, make_params, param_shapes, sync
from providers import ADAM_PROVIDERS, compiled_comparisons, cpu_comparisons

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PSETS = ["a", "b"] + (["gpu_a", "gpu_b", "gpu_c"] if DEVICE.type == "cuda" else [])


CPU_CASES = [(group, provider) for group, providers in cpu_comparisons().items() for provider in providers]
gpu_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="the CPU runs test_cpu_step")
cpu_only = pytest.mark.skipif(DEVICE.type == "cuda", reason="a GPU runs test_step")


@gpu_only
@pytest.mark.parametrize("provider", list(ADAM_PROVIDERS))
@pytest.mark.parametrize("pset", PSETS)
def test_step(benchmark, provider, pset):
    _time(benchmark, ADAM_PROVIDERS[provider], pset, f"set {pset}")


@cpu_only
@pytest.mark.parametrize(("group", "provider"), CPU_CASES, ids=[f"{g.replace(' ', '_')}-{p}" for g, p in CPU_CASES])
@pytest.mark.parametrize("pset", PSETS)
def test_cpu_step(benchmark, group, provider, pset):
    _time(benchmark, cpu_comparisons()[group][provider], pset, f"set {pset}: {group}")


def _time(benchmark, factory, pset, group):
    ps = make_params(param_shapes(pset), torch.float32, DEVICE)
    opt = factory(ps)
    opt.step()  # lazy state init (and the CPU kernel's first-use build) outside the timing
    benchmark.group = group

    def step():
        opt.step()
        sync(DEVICE)

    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
    assert all(torch.isfinite(p).all() for p in ps[:3])


def main(argv: list[str] | None = None) -> None:
    """The CPU comparisons with every group's steps interleaved (pytest-benchmark times one
    provider after another, which a shared machine's load skews): median ms and the ratio
    to the group's baseline (torch's, or adabelief-pytorch's, optimizer)."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("sets", nargs="*", default=["a", "b"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--cpu-time", action="store_true", help="CPU time of all threads instead of wall time")
    parser.add_argument("--groups", default="", help="comma-separated groups (default: all), e.g. 'adam fused'")
    parser.add_argument("--compiled", action="store_true", help="the torch.compile groups instead")
    parser.add_argument("--threads", type=int, default=0, help="torch's intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:  # one thread: no OpenMP barrier spins in the CPU time of a loaded machine
        torch.set_num_threads(args.threads)
    wanted = [g.strip() for g in args.groups.split(",") if g.strip()]
    clock = time.process_time if args.cpu_time else time.perf_counter
    what = "CPU time" if args.cpu_time else "wall time"
    print(f"{torch.get_num_threads()} threads; {what}, median of {args.steps} interleaved steps per provider")
    print(f"{'set':<4} {'group':<18} {'provider':<18} {'ms':>9} {'ratio':>6}")
    for pset in args.sets:
        for group, factories in (compiled_comparisons() if args.compiled else cpu_comparisons()).items():
            if wanted and group not in wanted:
                continue
            med = interleaved(factories, param_shapes(pset), args.steps, 2, DEVICE, clock)
            for name, ms in med.items():
                print(f"{pset:<4} {group:<18} {name:<18} {ms:9.2f} {ms / med['baseline']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
