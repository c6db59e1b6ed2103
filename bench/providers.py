"""Parameter sets, bytes per step and the ``torch_fused+hist`` baseline, shared by
``bench_step.py`` and ``gpu_report.py``.

``torch_fused+hist`` is the honest alternative to fasthist: ``torch.optim.Adam(fused=True)``
followed, per tensor, by the leanest histogram of sqrt(v_hat) one can write with torch ops
over the same :class:`fasthist.LogBins` (sqrt, divide, bit key, table lookup, bincount: no
sort, no host sync). It fills the same ``step``/``total`` windows fasthist keeps.
"""

from __future__ import annotations

import torch

import fasthist

__all__ = ["ACCESSES", "TorchFusedPlusHist", "adabelief_package", "adam_bytes", "gpu_param_shapes", "step_bytes"]


def gpu_param_shapes(name: str) -> list[tuple[int, ...]]:
    """The GPU sets of issue 3.

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


#: Accesses per parameter element one step must make, with the default options and the
#: states in the parameter dtype: Adam reads p, g, m, v and writes p, m, v; AdaBelief the
#: same with s for v; RMSprop (not centered, no momentum) reads p, g, v and writes p, v;
#: Adagrad reads p, g, sum and writes p, sum.
ACCESSES = {"adam": 7, "adabelief": 7, "rmsprop": 5, "adagrad": 5}


def step_bytes(params: list[torch.Tensor], optimizer: str = "adam", scaler: bool = False) -> int:
    """Bytes one ``optimizer`` step must move (:data:`ACCESSES` per element); with a
    ``GradScaler`` one more read of every gradient (its inf/NaN check)."""
    k = ACCESSES[optimizer] + (1 if scaler else 0)
    return sum(k * p.numel() * p.element_size() for p in params)


def adam_bytes(params: list[torch.Tensor]) -> int:
    """Bytes an Adam step must move: read param, grad, exp_avg, exp_avg_sq; write param,
    exp_avg, exp_avg_sq (7 accesses per element, states in the param dtype)."""
    return step_bytes(params, "adam")


def adabelief_package() -> tuple[type | None, str]:
    """``adabelief_pytorch.AdaBelief`` (the published implementation fasthist.AdaBelief
    follows) and its version, or ``(None, why)`` when it does not import (it is an optional
    test extra and usually absent on a bare GPU machine)."""
    try:
        import adabelief_pytorch
        from adabelief_pytorch import AdaBelief
    except Exception as e:  # ImportError, or its own imports (tabulate, colorama) missing
        return None, f"{type(e).__name__}: {e}"
    return AdaBelief, getattr(adabelief_pytorch, "__version__", "?")


class TorchFusedPlusHist:
    """``torch.optim.Adam(fused=True)`` + a per-tensor torch-op histogram of sqrt(v_hat)."""

    def __init__(self, params: list[torch.Tensor], bins: fasthist.LogBins | None = None, **kwargs) -> None:
        self.params = list(params)
        self.opt = torch.optim.Adam(self.params, fused=True, **kwargs)
        self.bins = bins or fasthist.LogBins()
        self.beta2 = self.opt.param_groups[0]["betas"][1]
        device = self.params[0].device
        n, nb = len(self.params), self.bins.num_bins
        self.step_counts = torch.zeros(n, nb, dtype=torch.int64, device=device)
        self.total_counts = torch.zeros_like(self.step_counts)
        # c = sqrt(1 - beta2**step) <= 1, so no value of sqrt(v)/c is a subnormal small
        # enough to share key 0 with +0: the table sends key 0 to the zero bin directly.
        self.table = self.bins.key_table_on(device, key0_is_zero=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.opt.step()
        shift, nb = self.bins.shift, self.bins.num_bins
        for i, p in enumerate(self.params):
            st = self.opt.state[p]
            c = (1 - torch.pow(self.beta2, st["step"].to(torch.float32))).sqrt()  # on the device: no sync
            x = st["exp_avg_sq"].to(torch.float32).sqrt().div_(c)
            keys = x.view(torch.int32).bitwise_and_(0x7FFFFFFF).bitwise_right_shift_(shift)
            counts = torch.bincount(self.table[keys.reshape(-1)], minlength=nb)
            self.step_counts[i].copy_(counts)
            self.total_counts[i].add_(counts)
