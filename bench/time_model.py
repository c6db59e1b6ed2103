"""How long ``gpu_report.py`` should take on an H200: a rough model, for planning only.

A step costs max(device time, host time) + 0.05 ms: the device moves :data:`MULT` x the
step's bytes at :data:`BANDWIDTH`, the host spends :data:`HOST_US` per tensor (this
project's CPU measurement of torch's fused Adam, 3.3 us/tensor, rounded up). Each fasthist
kernel specialisation compiles once (:data:`COMPILE_S`); each measurement adds
:data:`SETUP_S` (optimizer state, gc, empty_cache); imports, CUDA start and the copy test
:data:`FIXED_S`.
"""

from __future__ import annotations

import torch
from harness import ACCESSES, DTYPES, GPU_SETS, set_size

__all__ = [
    "BANDWIDTH",
    "COMPILE_S",
    "FIXED_S",
    "SETUP_S",
    "estimate",
    "kernel_key",
    "provider_kind",
    "step_ms",
]

BANDWIDTH = 4.0e12  # bytes/s
MULT = {"fused": 1.0, "foreach": 2.5, "hist": 3.5, "loop": 6.0}
HOST_US = {"fused": 4.0, "foreach": 6.0, "hist": 35.0, "loop": 150.0}
SCALER_HOST_US = 3.0
COMPILE_S = 4.0
SETUP_S = 0.3
FIXED_S = 15.0


def provider_kind(provider: str) -> str:
    """``fused`` (one kernel per step), ``foreach``, ``hist`` (torch_fused+hist) or ``loop`` (per tensor in Python)."""
    base = provider.removesuffix("+scaler")
    if base == "torch_fused+hist":
        return "hist"
    if base == "torch_foreach":
        return "foreach"
    if base == "adabelief_pytorch":
        return "loop"
    return "fused"


def step_ms(optimizer: str, provider: str, numel: int, tensors: int, elem: int, scaler: bool) -> float:
    """Estimated ms of one step of ``provider`` on ``tensors`` tensors of ``numel`` elements of ``elem`` bytes in all."""
    kind = provider_kind(provider)
    nbytes = (ACCESSES[optimizer] + (1 if scaler else 0)) * numel * elem
    device_ms = nbytes * MULT[kind] / BANDWIDTH * 1e3
    host_ms = tensors * (HOST_US[kind] + (SCALER_HOST_US if scaler else 0.0)) / 1e3
    return max(device_ms, host_ms) + 0.05


def kernel_key(optimizer: str, provider: str, dtype: str, scaler: bool) -> tuple | None:
    """The fasthist kernel specialisation a provider compiles (None for torch's own)."""
    if not provider.startswith("fasthist"):
        return None
    return (optimizer, dtype, "notrack" not in provider, scaler)


def estimate(adam_plan, candidate_plan, adam_steps: int, candidate_steps: int) -> dict[str, float]:
    """Seconds the run should take on an H200: ``{"adam", "candidates", "compile", "total"}``.

    ``adam_plan``: (set, dtype, provider) of the Adam rows; ``candidate_plan``: (set, dtype,
    candidates) of the GradScaler and other-optimizer rows; the steps count warm-up steps."""
    sizes = {s: set_size(s) for s in GPU_SETS}
    seen: set[tuple] = set()
    out = {"adam": 0.0, "candidates": 0.0, "compile": 0.0}

    def add(part, optimizer, provider, s, d, scaler, n):
        numel, tensors = sizes[s]
        elem = torch.empty((), dtype=DTYPES[d]).element_size()
        out[part] += n * step_ms(optimizer, provider, numel, tensors, elem, scaler) / 1e3 + SETUP_S
        key = kernel_key(optimizer, provider, d, scaler)
        if key is not None and key not in seen:
            seen.add(key)
            out["compile"] += COMPILE_S

    for s, d, prov in adam_plan:
        add("adam", "adam", prov, s, d, False, adam_steps)
    for s, d, jobs in candidate_plan:
        done = set()
        for c in jobs:
            if (c.optimizer, c.provider) in done or (c.max_tensors is not None and sizes[s][1] > c.max_tensors):
                continue
            done.add((c.optimizer, c.provider))
            add("candidates", c.optimizer, c.provider, s, d, c.scaler, candidate_steps)
    out["total"] = FIXED_S + out["adam"] + out["candidates"] + out["compile"]
    return out
