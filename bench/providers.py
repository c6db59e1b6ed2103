"""The optimizers the benchmarks time: the Adam providers shared by ``bench_step.py`` and
``gpu_report.py``, the ``torch_fused+hist`` baseline, the optional ``adabelief_pytorch``, and
the CPU comparisons of every optimizer (:func:`cpu_comparisons`).

``torch_fused+hist`` is the honest alternative to fasthist: ``torch.optim.Adam(fused=True)``
followed, per tensor, by the leanest histogram of sqrt(v_hat) one can write with torch ops
over the same :class:`fasthist.LogBins` (sqrt, divide, bit key, table lookup, bincount: no
sort, no host sync). It fills the same ``step``/``total`` windows fasthist keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import fasthist

__all__ = [
    "ADAM_PROVIDERS",
    "Compiled",
    "TorchFusedPlusHist",
    "adabelief_package",
    "compiled_comparisons",
    "cpu_comparisons",
]


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


#: The Adam providers, by name: the baseline ``torch_fused``, torch's ``torch_foreach``,
#: fasthist's Triton step with and without the histogram, and ``torch_fused+hist``.
ADAM_PROVIDERS: dict[str, Callable[[list[torch.Tensor]], object]] = {
    "torch_foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch_fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "fasthist_notrack": lambda ps: fasthist.Adam(ps, fused=True, track=False),
    "fasthist_track": lambda ps: fasthist.Adam(ps, fused=True, track=True),
    "torch_fused+hist": lambda ps: TorchFusedPlusHist(ps),
}


def _adabelief_baseline(ps: list[torch.Tensor]) -> object:
    pkg, why = adabelief_package()
    if pkg is None:
        raise RuntimeError(f"adabelief_pytorch is not importable: {why}")
    return pkg(ps, print_change_log=False)


#: (torch's optimizer or the package's, fasthist's, whether both have a fused CPU step)
_PAIRS: dict[str, tuple[Callable[..., object], type, bool]] = {
    "adam": (torch.optim.Adam, fasthist.Adam, True),
    "adamw": (torch.optim.AdamW, fasthist.AdamW, True),
    "rmsprop": (torch.optim.RMSprop, fasthist.RMSprop, False),
    "adagrad": (torch.optim.Adagrad, fasthist.Adagrad, True),
    "adabelief": (lambda ps, **kw: _adabelief_baseline(ps), fasthist.AdaBelief, False),
}


def cpu_comparisons() -> dict[str, dict[str, Callable[[list[torch.Tensor]], object]]]:
    """The CPU comparisons, by group: ``"<optimizer> default"`` (the
    optimizer as ``Cls(params)`` builds it: torch's own update, then the histogram) and
    ``"<optimizer> fused"`` (``fused=True`` on both sides), each with the baseline first,
    then fasthist with ``track=False`` and tracked (and tracking staleness too, for the
    optimizers that can). Adam's fused group also has ``torch_fused+hist``."""
    out: dict[str, dict[str, Callable[[list[torch.Tensor]], object]]] = {}
    for name, (base, cls, fused) in _PAIRS.items():
        modes = [("default", {})] + ([("fused", {"fused": True})] if fused else [])
        for mode, kw in modes:
            out[f"{name} {mode}"] = {
                "baseline": lambda ps, base=base, kw=kw: base(ps, **kw),
                "fasthist_notrack": lambda ps, cls=cls, kw=kw: cls(ps, track=False, **kw),
                "fasthist_track": lambda ps, cls=cls, kw=kw: cls(ps, track=True, **kw),
            }
            if "staleness" in cls.declaration.trackable:  # both quantities, in the same step
                out[f"{name} {mode}"]["fasthist_track+staleness"] = lambda ps, cls=cls, kw=kw: cls(
                    ps, track=("sqrt_v", "staleness"), **kw
                )
    out["adam fused"]["torch_fused+hist"] = lambda ps: TorchFusedPlusHist(ps)
    return out


class Compiled:
    """``opt`` whose ``step()`` runs ``torch.compile(lambda: opt.step(), **options)``: a
    training loop that compiles its optimizer step. The first step compiles (time it in
    the warm-up)."""

    def __init__(self, opt: object, **options) -> None:
        self.opt = opt
        self._step = torch.compile(lambda: opt.step(), **options)  # type: ignore[attr-defined]

    def step(self) -> None:
        self._step()


def compiled_comparisons() -> dict[str, dict[str, Callable[[list[torch.Tensor]], object]]]:
    """The compiled rows, per optimizer as ``Cls(params)`` builds it: the eager
    baseline first (torch's optimizer), torch's optimizer compiled (inductor), fasthist
    tracked eager and compiled. ``bench_step.py --compiled``."""
    out: dict[str, dict[str, Callable[[list[torch.Tensor]], object]]] = {}
    for name in ("adam", "adabelief"):
        base, cls, _ = _PAIRS[name]
        group = {
            "baseline": lambda ps, base=base: base(ps),
            "baseline_compiled": lambda ps, base=base: Compiled(base(ps)),
            "fasthist_track": lambda ps, cls=cls: cls(ps),
            "fasthist_track_compiled": lambda ps, cls=cls: Compiled(cls(ps)),
        }
        if name == "adabelief":  # the package's Python loop: nothing of torch's to compile
            del group["baseline_compiled"]
        out[f"{name} compiled"] = group
    return out
