"""One optimizer step, per provider and parameter set (pytest-benchmark).

    python -m pytest bench/bench_step.py                        # measure (CPU or GPU)
    python -m pytest bench/bench_step.py --benchmark-disable     # smoke run (CI)

Providers (``providers.ADAM_PROVIDERS``): torch.optim.Adam foreach / fused, fasthist.Adam
with track=False / True (``fused=True``, so on the reference backend the update is torch's
fused kernel and the difference is the histogram), and ``torch_fused+hist`` (torch's fused
Adam followed by the leanest per-tensor torch-op histogram, see ``providers.py``). Sets
(``harness.param_shapes``): (a) 12.6M parameters in 20 tensors, (b) 1,000 tensors of
1k-10k elements; with CUDA also the GPU sets ``gpu_a`` (1.1B in 201 tensors), ``gpu_b``
(GPT-2 small), ``gpu_c`` (2,000 tensors, 20M). Compare ratios within one run, not absolute
times; ``gpu_report.py`` is the GPU measurement of record.
"""

from __future__ import annotations

import pytest
import torch
from harness import make_params, param_shapes, sync
from providers import ADAM_PROVIDERS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PSETS = ["a", "b"] + (["gpu_a", "gpu_b", "gpu_c"] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("provider", list(ADAM_PROVIDERS))
@pytest.mark.parametrize("pset", PSETS)
def test_step(benchmark, provider, pset):
    ps = make_params(param_shapes(pset), torch.float32, DEVICE)
    opt = ADAM_PROVIDERS[provider](ps)
    opt.step()  # lazy state init outside the timing
    benchmark.group = f"set {pset}"

    def step():
        opt.step()
        sync(DEVICE)

    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
    assert all(torch.isfinite(p).all() for p in ps[:3])
