"""One table of the fasthist optimizers, after torch's ``OptimizerInfo``
(``torch/testing/_internal/common_optimizers.py``): what every contract test in
``test_contract.py`` runs over, and the data the per-optimizer test files share.

Each :class:`OptimInfo` names the class, the optimizer it must equal step for step (its
torch counterpart, or ``adabelief_pytorch`` for AdaBelief), the flag sets to compare
under, the exact value its histograms count (read back from the optimizer state), the
constructor arguments it must reject, and the backends it runs on.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from torch import Tensor

import fasthist
from fasthist.reference.adabelief import adabelief_scale_inv

STEPS = 60
# A matrix, a vector, an odd 3-d shape (no tensor is a multiple of a block), a 0-d scalar.
SHAPES = [(7, 5), (13,), (3, 4, 2), ()]


def make_params(seed: int = 0, dtype=torch.float32) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]


def grads_at(step: int, params: list[Tensor]) -> list[Tensor]:
    """Gradients spanning ~10 decades so the histograms fill many bins; some exact zeros."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in params:
        mag = 10.0 ** (torch.rand(p.shape, generator=g, dtype=torch.float64) * 10 - 7)
        gr = torch.randn(p.shape, generator=g, dtype=torch.float64) * mag
        if p.dim() == 2:
            gr[0] = 0.0  # a dead row: exact zeros in the state
        out.append(gr.to(p.dtype))
    return out


def sqrt_rn(v: Tensor) -> Tensor:
    """Correctly rounded float32 sqrt (the backends' ``sqrt_rn``): a float64 sqrt rounds
    to float32 without double-rounding error (53 >= 2*24 + 2 bits)."""
    return v.double().sqrt().float()


# -- the histogrammed value of each optimizer, from its state ------------------------------
def adam_value(state: dict, group: dict) -> Tensor:
    """sqrt(v_hat): ``fl32(sqrt(v)) / fl32(sqrt(1 - beta2**step))``."""
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    beta2 = float(group["betas"][1])
    step = state["step"]
    if step.device.type == "cpu":  # bias correction on the host in float64, as torch does
        c = torch.tensor((1 - beta2 ** float(step)) ** 0.5, dtype=torch.float32)
    else:
        c = (1 - torch.pow(beta2, step.float())).sqrt()
    return sqrt_rn(v) / c  # correctly rounded (torch's CPU float32 sqrt is not always)


def rmsprop_value(state: dict, group: dict) -> Tensor:
    """sqrt(v), or sqrt(v - grad_avg**2) when centered: what torch adds eps to."""
    v = state["square_avg"]
    if group["centered"]:
        v = v.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
    return sqrt_rn(v)


def adagrad_value(state: dict, group: dict) -> Tensor:
    return sqrt_rn(state["sum"])


def adabelief_value(state: dict, group: dict) -> Tensor:
    """(1-beta2) * s_hat = s * float32(1 / ((1 - beta2**t) / (1 - beta2))), one float32 multiply."""
    _, beta2 = group["betas"]
    t = int(state["step"])
    v = state["max_exp_avg_var"] if group["amsgrad"] and not group["rectify"] else state["exp_avg_var"]
    return v.float() * torch.tensor(adabelief_scale_inv(t, beta2), dtype=torch.float32)


def adabelief_package(params, **kw):
    """``adabelief_pytorch.AdaBelief`` (skips the test without the package), silenced."""
    adabelief_pytorch = pytest.importorskip("adabelief_pytorch")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its change log
        return adabelief_pytorch.AdaBelief(params, print_change_log=False, **kw)


# -- the table -------------------------------------------------------------------------
@dataclass(frozen=True)
class BadInput:
    """Constructor arguments the optimizer rejects. ``exc``/``match``: what it raises;
    None: exactly what its reference raises (type and message)."""

    kwargs: dict[str, Any]
    exc: type[Exception] | None = None
    match: str | None = None


@dataclass(frozen=True)
class OptimInfo:
    name: str
    cls: type[torch.optim.Optimizer]
    reference: Callable[..., Any]  # params, **kwargs -> the optimizer to equal
    configs: dict[str, dict[str, Any]]  # flag sets for the step-for-step comparison
    value: Callable[[dict, dict], Tensor]  # (state, group) -> the value the histograms count
    bad_inputs: list[BadInput]
    # the reference's state keys compared (None: all), bit for bit: the reference backend
    # is the reference's own code
    state_keys: tuple[str, ...] | None = None
    sparse_error: str | None = None  # what step() says to a sparse gradient; None: accepts them
    estimate_names: tuple[str, ...] = ()  # its names in fasthist.estimate's registry
    backend_config: dict[str, Any] = field(default_factory=dict)  # flags of the cross-backend test
    backends: tuple[str, ...] = ("torch", "triton")

    def __repr__(self) -> str:
        return self.name


def _ids(configs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {",".join(f"{k}={v}" for k, v in c.items()) or "default": c for c in configs}


ADAM_CONFIGS = {
    "defaults": {},
    "lr": {"lr": 3e-3},
    "weight_decay": {"weight_decay": 0.1},
    "maximize": {"maximize": True},
    "amsgrad": {"amsgrad": True},
    "decoupled": {"weight_decay": 0.1, "decoupled_weight_decay": True},
    "tensor_lr": {"lr": torch.tensor(2e-3)},
    "foreach": {"foreach": True, "amsgrad": True},
    "fused": {"fused": True, "weight_decay": 0.01},
    "betas_eps": {"betas": (0.8, 0.99), "eps": 1e-6},
}
ADAM_BAD = [
    BadInput({"lr": -1.0}),
    BadInput({"eps": -1.0}),
    BadInput({"betas": (1.0, 0.9)}),
    BadInput({"betas": (0.9, -0.1)}),
    BadInput({"weight_decay": -1}),
    BadInput({"fused": True, "differentiable": True}),
]

ADAM = OptimInfo(
    "adam",
    fasthist.Adam,
    torch.optim.Adam,
    ADAM_CONFIGS,
    adam_value,
    ADAM_BAD,
    sparse_error="Adam does not support sparse gradients",  # torch's AdamW says so too
    estimate_names=("adam",),
    backend_config={"lr": 1e-2, "amsgrad": True},
)
OPTIMS = [
    ADAM,
    replace(
        ADAM,
        name="adamw",
        cls=fasthist.AdamW,
        reference=torch.optim.AdamW,
        configs={k: ADAM_CONFIGS[k] for k in ("defaults", "amsgrad", "maximize", "fused")},
        bad_inputs=ADAM_BAD[:4],
        estimate_names=(),
    ),
    OptimInfo(
        "rmsprop",
        fasthist.RMSprop,
        torch.optim.RMSprop,
        _ids(
            [
                {},
                {"centered": True},
                {"momentum": 0.9},
                {"centered": True, "momentum": 0.5},
                {"alpha": 0.9},
                {"weight_decay": 0.1},
                {"maximize": True},
                {"centered": True, "momentum": 0.9, "alpha": 0.95, "weight_decay": 1e-2, "maximize": True},
                {"foreach": True, "centered": True, "momentum": 0.9},
                {"foreach": False, "centered": True},
                {"lr": torch.tensor(3e-3)},
                {"eps": 1e-3, "lr": 0.1},
            ]
        ),
        rmsprop_value,
        [BadInput({"alpha": -1.0}, ValueError, "Invalid alpha value"), BadInput({"lr": -1.0})],
        sparse_error="RMSprop does not support sparse gradients",
        estimate_names=("rmsprop", "rmsprop-centered"),
        backend_config={"lr": 1e-3, "centered": True, "momentum": 0.9},
    ),
    OptimInfo(
        "adagrad",
        fasthist.Adagrad,
        torch.optim.Adagrad,
        _ids(
            [
                {},
                {"lr_decay": 0.05},
                {"weight_decay": 0.1},
                {"initial_accumulator_value": 0.1},
                {"eps": 1e-3, "lr": 0.1},
                {"maximize": True},
                {"lr_decay": 1e-2, "weight_decay": 1e-2, "initial_accumulator_value": 1e-4, "maximize": True},
                {"foreach": True, "lr_decay": 1e-2},
                {"foreach": False, "weight_decay": 1e-2},
                {"fused": True, "lr_decay": 1e-2, "initial_accumulator_value": 1e-3},
                {"lr": torch.tensor(3e-2)},
            ]
        ),
        adagrad_value,
        [BadInput({"lr_decay": -1.0}, ValueError, "Invalid lr_decay value"), BadInput({"eps": -1.0})],
        estimate_names=("adagrad",),
        backend_config={"lr_decay": 1e-2},
    ),
    OptimInfo(
        "adabelief",
        fasthist.AdaBelief,
        adabelief_package,
        _ids(
            [
                {},  # the package's defaults: eps=1e-16, decoupled decay, rectified
                {"weight_decay": 1e-2},
                {"weight_decay": 1e-2, "fixed_decay": True},
                {"weight_decay": 1e-2, "weight_decouple": False},
                {"rectify": False},
                {"rectify": False, "amsgrad": True},
                {"amsgrad": True},  # rectified updates ignore the max (as the package does)
                {"degenerated_to_sgd": False},
                {"eps": 1e-8, "betas": (0.8, 0.99), "lr": 1e-2},
                {"betas": (0.9, 0.9)},  # short warm-up: rho_t >= 5 from step ~7 on
            ]
        ),
        adabelief_value,
        [
            BadInput({"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1"),
            BadInput({"eps": -1.0}, ValueError, "Invalid epsilon value"),
            BadInput({"lr": -1.0}),
            BadInput({"weight_decay": -1.0}, ValueError, "Invalid weight_decay value"),
        ],
        state_keys=("exp_avg", "exp_avg_var", "max_exp_avg_var"),
        sparse_error="AdaBelief does not support sparse gradients",
        estimate_names=("adabelief",),
        backend_config={"weight_decay": 1e-2},
    ),
]
BY_NAME = {info.name: info for info in OPTIMS}


def config_cases(names: list[str] | None = None) -> list[Any]:
    """``pytest.param(info, config)`` for every flag set of every optimizer (or of ``names``)."""
    return [
        pytest.param(info, config, id=f"{info.name}-{cid}")
        for info in OPTIMS
        if names is None or info.name in names
        for cid, config in info.configs.items()
    ]


def check_estimate_pass(name: str, value_of: Callable[[dict, dict], Tensor]) -> list:
    """``estimate_eps_range(optimizer=name)``: weights untouched bit for bit, and the per-tensor
    percentiles equal the sort-based rule on the exact value read from the pass's state."""
    from fasthist.estimate import eps_pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(6)]

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    opt = eps_pass(model, batches, loss_fn, optimizer=name, progress=False)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    rng = opt.eps_range()
    rel = opt.bins.relative_accuracy
    by_name = {r.name: r for r in rng.rows}
    for pname, p in model.named_parameters():
        a = value_of(opt.state[p], opt.param_groups[0]).reshape(-1)
        a = a[a != 0].sort().values
        n = a.numel()
        row = by_name[pname]
        assert row.nonzero == n
        for q, got in ((0.02, row.low), (0.98, row.high)):
            exact = float(a[min(int(q * n), n - 1)])
            assert abs(got - exact) <= rel * exact * (1 + 1e-9), (pname, q, got, exact)
    return rng.rows
