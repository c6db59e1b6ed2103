"""Reference Adam/AdamW step with histograms of sqrt(v_hat).

The update is ``torch.optim.adam.adam`` itself, with every flag the group carries
(foreach, fused, capturable, differentiable, grad_scale/found_inf, ...), so this backend
is torch's Adam bit for bit. Then, per tensor::

    v      = max_exp_avg_sq if amsgrad else exp_avg_sq       # what the denominator uses
    c      = sqrt(1 - beta2**step)                           # bias_correction2_sqrt
    x      = float32(sqrt(v)) / float32(c)                   # the value eps is added to
    hist  += bins of x                                       # fasthist.reference.histogram

``c`` is computed as torch computes it: on the host in float64 when the step counts are
on the CPU, else on the device in float32 (capturable/fused), so no host sync is needed.
Under ``torch.compile`` the same code computes it, inside the opaque custom op
``fasthist::bias_correction2_sqrt`` (no ``Tensor.item()`` in the graph, no guard on the
step count, and nothing for the compiler to re-derive): compiled and eager steps divide by
the same float32 ``c``, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

from ..declaration import HistInputs
from . import reference_step
from .staleness import coupled_entering_grads

__all__ = ["adam_entering_grads", "adam_hist_inputs", "adam_reference", "bias_correction2_sqrt"]


def _host_scales(state_steps: list[Tensor], beta2: float) -> list[float]:
    """``(1 - beta2**step) ** 0.5`` in float64 (Python floats: C ``pow``), per tensor; one
    power per distinct step count (usually one for the whole group)."""
    try:  # one stack of the 0-d step counts (a per-tensor reshape costs ~1 us each)
        stacked = torch.stack(state_steps).detach().reshape(-1)
    except RuntimeError:  # counts of other shapes
        stacked = torch.stack([s.detach().reshape(()) for s in state_steps])
    if stacked.numel() != len(state_steps):
        stacked = torch.stack([s.detach().reshape(()) for s in state_steps])
    steps = stacked.to(torch.float64).tolist()
    if len(set(steps)) == 1:  # the usual case: every tensor of the group at the same step
        return [(1 - beta2 ** steps[0]) ** 0.5] * len(steps)
    memo: dict[float, float] = {}
    return [memo[s] if s in memo else memo.setdefault(s, (1 - beta2**s) ** 0.5) for s in steps]


def _device_scales(state_steps: list[Tensor], beta2: float | Tensor) -> Tensor:
    """``sqrt(1 - beta2**step)`` in float32 on the steps' device (no host sync)."""
    steps = torch.stack([s.reshape(()) for s in state_steps]).to(torch.float32)
    if isinstance(beta2, Tensor):
        beta2 = beta2.to(device=steps.device, dtype=torch.float32)
    return (1 - torch.pow(beta2, steps)).sqrt()


@torch.library.custom_op("fasthist::bias_correction2_sqrt", mutates_args=())
def _bias_correction2_sqrt_op(state_steps: list[Tensor], beta2: float, beta2_tensor: Tensor | None) -> Tensor:
    """:func:`bias_correction2_sqrt` as a float32 tensor, for compiled steps."""
    b2: float | Tensor = beta2 if beta2_tensor is None else beta2_tensor
    if all(s.is_cpu for s in state_steps):
        return torch.tensor(_host_scales(state_steps, float(b2)), dtype=torch.float32)
    return _device_scales(state_steps, b2).clone()


@_bias_correction2_sqrt_op.register_fake
def _(state_steps: list[Tensor], beta2: float, beta2_tensor: Tensor | None) -> Tensor:
    device = "cpu" if all(s.is_cpu for s in state_steps) else state_steps[0].device
    return torch.empty(len(state_steps), dtype=torch.float32, device=device)


def bias_correction2_sqrt(state_steps: list[Tensor], beta2: float | Tensor) -> list[float] | Tensor:
    """``sqrt(1 - beta2**step)`` per tensor, after the step counter was incremented: Python
    floats (float64) when every step count is on the CPU, else a float32 device tensor.

    Under ``torch.compile`` always a float32 tensor (on the CPU for host step counts), from
    the custom op ``fasthist::bias_correction2_sqrt``, which runs this same code: its values
    are the eager ones rounded to float32, which is what every backend divides by."""
    if torch.compiler.is_compiling():
        tensor = beta2 if isinstance(beta2, Tensor) else None
        return _bias_correction2_sqrt_op(state_steps, 0.0 if tensor is not None else float(beta2), tensor)
    if all(s.is_cpu for s in state_steps):
        return _host_scales(state_steps, float(beta2))
    return _device_scales(state_steps, beta2)


def adam_hist_inputs(lists: list[list[Tensor]], kwargs: dict[str, Any]) -> HistInputs:
    """After the update: ``v`` (``max_exp_avg_sq`` with amsgrad), the bias corrections ``c``
    (:func:`bias_correction2_sqrt`) and ``found_inf``; the histogram holds ``sqrt(v) / c``."""
    _, _, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = lists
    values = max_exp_avg_sqs if kwargs.get("amsgrad") else exp_avg_sqs
    scale = bias_correction2_sqrt(state_steps, kwargs["beta2"])
    return [v.detach() for v in values], scale, kwargs.get("found_inf")


def _fma_float32(a: Tensor, b: float, c: Tensor) -> Tensor:
    """``fma(a, b, c)`` of float32 values (``b`` one, as a float), rounded once to float32, as
    an fma instruction does: the product is exact in float64 (24 + 24 bits), the float64 sum
    is made round-to-odd (its exact error by TwoSum; where it is nonzero and the sum's last
    bit even, the neighbour toward the exact value), and rounding that to nearest float32 is
    the one rounding of the exact value (53 >= 24 + 2 bits: Boldo and Melquiond)."""
    prod = a.double() * b
    c = c.double()
    s = prod + c
    t = s - prod
    err = (prod - (s - t)) + (c - t)  # s + err == prod + c exactly (no overflow: |prod| < 2**256)
    inexact_even = (err != 0) & ((s.view(torch.int64) & 1) == 0)
    toward = torch.where(err > 0, torch.inf, -torch.inf).double()
    return torch.where(inexact_even, torch.nextafter(s, toward), s).float()


def _fused_entering_grad(p: Tensor, g: Tensor, grad_scale: Tensor | None, maximize: bool, wd: float) -> Tensor:
    """torch's fused step's ``g``, in its math type (float32; float64 for float64 tensors):
    ``g / grad_scale``, negated, then ``fma(p, wd, g)``, rounded once as torch's x86 kernels
    (contracted to an fma) compute it (:func:`_fma_float32`; for float64 formed with two
    float64 roundings)."""
    wide = torch.float64 if g.dtype in (torch.float64, torch.complex128) else torch.float32
    real = (lambda t: torch.view_as_real(t)) if g.is_complex() else (lambda t: t)
    x = real(g.detach()).to(wide)
    if grad_scale is not None:
        x = x / grad_scale.to(device=x.device, dtype=wide)
    if maximize:
        x = -x
    if wd:
        wd = float(torch.tensor(wd, dtype=wide))
        pr = real(p.detach())
        x = _fma_float32(pr, wd, x) if wide == torch.float32 else pr.double() * wd + x
    return x


def adam_entering_grads(lists: list[list[Tensor]], kwargs: dict[str, Any]) -> list[Tensor]:
    """Before the update: the gradient of each tensor as torch's Adam feeds it to ``v``.

    Non-fused: :func:`~fasthist.reference.staleness.coupled_entering_grads` (in the
    parameter's dtype). ``fused=True``: the fused kernel's math (:func:`_fused_entering_grad`),
    with ``grad_scale`` unscaled."""
    if not kwargs.get("fused"):
        return coupled_entering_grads(lists, kwargs)
    maximize = bool(kwargs.get("maximize"))
    wd = 0.0 if kwargs.get("decoupled_weight_decay") else kwargs.get("weight_decay", 0.0)
    scale = kwargs.get("grad_scale")
    return [_fused_entering_grad(p, g, scale, maximize, wd) for p, g in zip(lists[0], lists[1], strict=True)]


#: ``torch.optim.adam.adam`` (same keyword arguments), then the histogram pass in torch ops.
adam_reference = reference_step(torch_adam, adam_hist_inputs)
