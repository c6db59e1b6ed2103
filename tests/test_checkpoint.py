"""Checkpoint and resume: stop at step k, ``torch.save`` model + optimizer, load both into
fresh objects, continue. The resumed run must give exactly (bit for bit) the parameters,
the optimizer state and both histogram windows of the uninterrupted run, for every
fasthist optimizer on the reference backend, and for the fused Adam kernel under Triton's
interpreter (tiny tensors: each interpreted launch costs about a second).

The checkpoint is loaded with ``torch.load(weights_only=True)`` (torch's default): the
histogram counts and the bins spec must survive the safe unpickler. A checkpoint saved on
the GPU is loaded onto the CPU with ``map_location="cpu"`` in the ``gpu`` test.
"""

from __future__ import annotations

import importlib
import io
import os

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the first import of fasthist.kernels (the interpreter is chosen then)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fasthist  # noqa: E402
from fasthist.backend import kernels_module  # noqa: E402

OPTIMIZERS = {
    "adam": (fasthist.Adam, {"lr": 1e-2}),
    "adamw-amsgrad": (fasthist.AdamW, {"lr": 1e-2, "amsgrad": True}),
    "adam-foreach-wd": (fasthist.Adam, {"lr": 1e-2, "weight_decay": 1e-2, "foreach": True}),
    "rmsprop-centered-momentum": (fasthist.RMSprop, {"lr": 1e-3, "centered": True, "momentum": 0.9}),
    "adagrad": (fasthist.Adagrad, {"lr": 1e-2, "lr_decay": 1e-3, "initial_accumulator_value": 0.1}),
    "adabelief": (fasthist.AdaBelief, {"lr": 1e-2, "weight_decay": 1e-3}),
    "adabelief-amsgrad-unrectified": (fasthist.AdaBelief, {"lr": 1e-2, "amsgrad": True, "rectify": False}),
}


def make_model(device="cpu", width=16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 3, bias=False)).to(
        device
    )


def batch(step: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 6, generator=g).to(device), torch.randn(12, 3, generator=g).to(device)


def make_optimizer(name, model):
    cls, kw = OPTIMIZERS[name]
    # two groups, the second untracked: group options must round-trip too
    params = list(model.parameters())
    return cls([{"params": params[:2]}, {"params": params[2:], "track": False}], **kw)


def train(model, opt, steps, device="cpu"):
    for step in steps:
        x, y = batch(step, device)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def snapshot(model, opt):
    return (
        [p.detach().cpu().clone() for p in model.parameters()],
        {k: h.counts.cpu().clone() for k, h in opt.histograms().items()},
        {k: h.counts.cpu().clone() for k, h in opt.histograms(window="total").items()},
        {
            i: {k: v.detach().cpu().clone() for k, v in s.items() if torch.is_tensor(v)}
            for i, s in opt.state_dict()["state"].items()
        },
    )


def assert_same(a, b):
    params_a, step_a, total_a, state_a = a
    params_b, step_b, total_b, state_b = b
    for pa, pb in zip(params_a, params_b, strict=True):
        assert torch.equal(pa, pb)
    assert step_a.keys() == step_b.keys() and total_a.keys() == total_b.keys()
    for k in step_a:
        assert torch.equal(step_a[k], step_b[k]), k
        assert torch.equal(total_a[k], total_b[k]), k
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()
        for k in state_a[i]:
            assert state_a[i][k].dtype == state_b[i][k].dtype, (i, k)
            assert torch.equal(state_a[i][k], state_b[i][k]), (i, k)


def run_with_resume(name, total, k, device="cpu", map_location=None, width=16):
    model = make_model(device, width)
    opt = make_optimizer(name, model)
    train(model, opt, range(k), device)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    del model, opt
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True, map_location=map_location)
    target = map_location or device
    model = make_model(target, width)
    model.load_state_dict(ckpt["model"])
    opt = make_optimizer(name, model)
    opt.load_state_dict(ckpt["optimizer"])
    train(model, opt, range(k, total), target)
    return model, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_exact_on_the_reference_backend(name, use_backend):
    use_backend("torch")
    model, opt = make_model(), None
    opt = make_optimizer(name, model)
    train(model, opt, range(12))
    uninterrupted = snapshot(model, opt)
    model2, opt2 = run_with_resume(name, 12, 5)
    resumed = snapshot(model2, opt2)
    assert_same(uninterrupted, resumed)
    # the histograms are really there: the total window counts 12 steps of the tracked tensors
    tracked = sum(p.numel() for p in list(model.parameters())[:2])
    assert sum(int(c.sum()) for c in resumed[2].values()) == 12 * tracked
    # and the state dict saves the counts' bytes (any float cast keeps them), not the
    # counts cast to the parameters' dtype: they read back as the int64 counts
    params2 = list(model2.parameters())
    for i, st in opt2.state_dict()["state"].items():
        if "hist_total" in st:
            assert st["hist_total"].dtype == torch.uint8
            back = fasthist.store.loadable_counts({i: {"hist_total": st["hist_total"]}}, opt2.bins.num_bins)
            assert torch.equal(back[i]["hist_total"], opt2.histogram(params2[i], window="total").counts)


def test_resume_at_step_zero_and_after_the_last_step(use_backend):
    use_backend("torch")
    for k in (0, 6):
        model, opt = make_model(), None
        opt = make_optimizer("adam", model)
        train(model, opt, range(6))
        assert_same(snapshot(model, opt), snapshot(*run_with_resume("adam", 6, k)))


def _triton_kernel_available(op: str) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    mod = kernels_module(interpret=not torch.cuda.is_available())
    if mod is None:
        return False
    try:
        importlib.import_module(f"{mod.__name__}.{op}")
    except ImportError:
        return False
    return True


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "name", ["adam", "adamw-amsgrad", "rmsprop-centered-momentum", "adagrad", "adabelief-amsgrad-unrectified"]
)
def test_resume_is_exact_on_the_triton_backend(name, use_backend):
    op = name.split("-")[0].replace("adamw", "adam")
    if not _triton_kernel_available(op):
        pytest.skip(f"fasthist.kernels.{op} is not importable here")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the kernels need TRITON_INTERPRET=1 on a machine without CUDA")
    use_backend("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total, k, width = 4, 2, 4  # tiny: every interpreted launch is slow
    model = make_model(device, width)
    opt = make_optimizer(name, model)
    train(model, opt, range(total), device)
    assert {c.backend for c in opt.backends().values()} == {"triton"}, opt.backends()
    uninterrupted = snapshot(model, opt)
    assert_same(uninterrupted, snapshot(*run_with_resume(name, total, k, device, width=width)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adam", "rmsprop-centered-momentum", "adabelief"])
def test_gpu_checkpoint_loads_on_cpu(name, use_backend):
    """Saved on CUDA, loaded with map_location="cpu": the run continues on the CPU and
    agrees with the uninterrupted GPU run (bit for bit on the histograms of the steps
    before the checkpoint; the parameters within float32 rounding of CPU vs GPU kernels)."""
    use_backend("auto")
    model, opt = make_model("cuda"), None
    opt = make_optimizer(name, model)
    train(model, opt, range(8), "cuda")
    gpu_run = snapshot(model, opt)
    model2, opt2 = run_with_resume(name, 8, 4, "cuda", map_location="cpu")
    assert all(p.device.type == "cpu" for p in model2.parameters())
    for p, rows in opt2._hist_store().counts.items():
        for key, t in rows.items():
            assert t.device == p.device and t.dtype == torch.int64, key
    cpu_run = snapshot(model2, opt2)
    for a, b in zip(gpu_run[0], cpu_run[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # same number of elements counted in both windows; bins agree up to rounding differences
    for k in gpu_run[2]:
        assert int(gpu_run[2][k].sum()) == int(cpu_run[2][k].sum())


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_copied_optimizer_keeps_its_state_dict_hooks(copy_with):
    """torch's pickling keeps no hooks: a copy registers them again, so its state dict
    holds the counts as bytes and its load puts back exactly what a bf16 detour through
    torch.optim cast (counts past bf16's 256 included)."""
    import copy
    import pickle

    p = torch.zeros(301, dtype=torch.bfloat16, requires_grad=True)
    opt = fasthist.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    twin = copy.deepcopy(opt) if copy_with == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for window in ("step", "total"):  # the copy has the counts
        assert torch.equal(twin.histogram(window=window).counts, opt.histogram(window=window).counts)
    assert twin.state_dict()["state"][0]["hist_step"].shape == (twin.bins.num_bins, 8)
    theirs = torch.optim.Adam([p.detach().clone().requires_grad_()])
    theirs.load_state_dict(opt.state_dict())
    twin.load_state_dict(theirs.state_dict())
    assert twin.histogram().count == 301
    assert torch.equal(twin.histogram().counts, opt.histogram().counts)
