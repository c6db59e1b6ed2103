"""One optimizer step, per provider and parameter set (pytest-benchmark).

    python -m pytest bench/bench_step.py                        # measure (CPU or GPU)
    python -m pytest bench/bench_step.py --benchmark-disable     # smoke run (CI)

Providers: torch.optim.Adam fused / foreach, fasthist.Adam with track=False / True
(``fused=True``, so on the reference backend the update is torch's fused kernel and the
difference is the histogram), and ``torch_fused+hist`` (torch's fused Adam followed by the
leanest per-tensor torch-op histogram, see ``providers.py``). Sets (issue 2): (a) 12.6M
parameters in 20 tensors, (b) 1,000 tensors of 1k-10k elements; with CUDA also the GPU sets
of issue 3, ``gpu_a`` (1.1B in 201 tensors), ``gpu_b`` (GPT-2 small), ``gpu_c`` (2,000
tensors, 20M). Compare ratios within one run, not absolute times; ``gpu_report.py`` is the
GPU measurement of record.
"""

from __future__ import annotations

import pytest
import torch
from providers import TorchFusedPlusHist, gpu_param_shapes

import fasthist

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def param_set(name: str) -> list[tuple[int, ...]]:
    if name == "a":  # a few big matrices: bandwidth-bound
        return [(1024, 1024)] * 8 + [(4096,)] * 8 + [(512, 2048)] * 4
    if name == "b":  # many small tensors: launch/Python-overhead-bound
        g = torch.Generator().manual_seed(0)
        return [(int(n),) for n in torch.randint(1000, 10001, (1000,), generator=g)]
    if name.startswith("gpu_"):
        return gpu_param_shapes(name[4:])
    raise ValueError(name)


def make_params(shapes, dtype=torch.float32, device=DEVICE) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    ps = []
    for s in shapes:
        p = torch.randn(s, generator=g, device=device, dtype=dtype).requires_grad_()
        p.grad = torch.randn(s, generator=g, device=device, dtype=dtype)
        ps.append(p)
    return ps


PROVIDERS = {
    "torch_fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "torch_foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "fasthist_notrack": lambda ps: fasthist.Adam(ps, fused=True, track=False),
    "fasthist_track": lambda ps: fasthist.Adam(ps, fused=True, track=True),
    "torch_fused+hist": lambda ps: TorchFusedPlusHist(ps),
}
PSETS = ["a", "b"] + (["gpu_a", "gpu_b", "gpu_c"] if DEVICE == "cuda" else [])


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("pset", PSETS)
def test_step(benchmark, provider, pset):
    ps = make_params(param_set(pset))
    opt = PROVIDERS[provider](ps)
    opt.step()  # lazy state init outside the timing
    benchmark.group = f"set {pset}"

    def step():
        opt.step()
        _sync()

    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
    assert all(torch.isfinite(p).all() for p in ps[:3])
