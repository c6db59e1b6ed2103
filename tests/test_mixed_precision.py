"""Low-precision parameters and loss scaling.

CPU (always run): bf16/fp16 parameters step for step against torch's own optimizers (and
adabelief-pytorch) with bf16/fp16 tolerances, states kept in the dtype the reference keeps
them in, histograms exactly equal to the histogram of the value computed from the state;
``torch.amp.GradScaler("cpu")`` skipping an overflowing step leaves parameters, states and
histograms untouched.

GPU (``@pytest.mark.gpu``, skipped without CUDA): GradScaler with the fused
``grad_scale``/``found_inf`` protocol, and a whole training step captured in a CUDA graph
with ``capturable=True``, replayed, matching eager execution with histograms updating on
every replay.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch

import fasthist
from fasthist.reference.adabelief import adabelief_scale_inv

STEPS = 50
TOL = {torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5}, torch.float16: {"rtol": 1e-3, "atol": 1e-5}}


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in [(9, 7), (11,), ()]]


def grad_at(step, p):
    """bf16 has float32's range: gradients over 6 decades. fp16 squares underflow below
    ~2e-4 (g*g < 6e-8), which makes v = 0 and 0/0 in torch's Adam: keep 2 decades."""
    g = torch.Generator().manual_seed(500 + step)
    low, span = (-4, 6) if p.dtype == torch.bfloat16 else (-1, 2)
    mag = 10.0 ** (torch.rand(p.shape, generator=g) * span + low)
    return (torch.randn(p.shape, generator=g) * mag).to(p.dtype)


def sqrt_rn(v):
    return v.double().sqrt().float()


def adam_value(opt, p):
    st = opt.state[p]
    v = st["max_exp_avg_sq"] if opt.param_groups[0]["amsgrad"] else st["exp_avg_sq"]
    c = (1 - opt.param_groups[0]["betas"][1] ** float(st["step"])) ** 0.5
    return sqrt_rn(v) / torch.tensor(c, dtype=torch.float32)


def rmsprop_value(opt, p):
    st = opt.state[p]
    v = st["square_avg"].float()
    if opt.param_groups[0]["centered"]:
        v = st["square_avg"].addcmul(st["grad_avg"], st["grad_avg"], value=-1).float()
    return sqrt_rn(v)


def adagrad_value(opt, p):
    return sqrt_rn(opt.state[p]["sum"].float())


def adabelief_value(opt, p):
    st, group = opt.state[p], opt.param_groups[0]
    beta2, t = group["betas"][1], int(st["step"])
    v = st["max_exp_avg_var"] if group["amsgrad"] and not group["rectify"] else st["exp_avg_var"]
    return v.float() * torch.tensor(adabelief_scale_inv(t, beta2), dtype=torch.float32)


def adabelief_package(params, **kw):
    adabelief_pytorch = pytest.importorskip("adabelief_pytorch")
    with contextlib.redirect_stdout(io.StringIO()):
        return adabelief_pytorch.AdaBelief(params, print_change_log=False, **kw)


CASES = {
    "adam": (fasthist.Adam, torch.optim.Adam, {"lr": 1e-2}, adam_value),
    "adam-amsgrad-wd": (
        fasthist.Adam,
        torch.optim.Adam,
        {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1},
        adam_value,
    ),
    "adamw-foreach": (fasthist.AdamW, torch.optim.AdamW, {"lr": 1e-2, "foreach": True}, adam_value),
    "adam-fused": (fasthist.Adam, torch.optim.Adam, {"lr": 1e-2, "fused": True}, adam_value),
    "rmsprop-centered": (
        fasthist.RMSprop,
        torch.optim.RMSprop,
        {"lr": 1e-3, "centered": True, "momentum": 0.9},
        rmsprop_value,
    ),
    "adagrad": (fasthist.Adagrad, torch.optim.Adagrad, {"lr": 1e-2, "lr_decay": 1e-2}, adagrad_value),
    "adabelief": (fasthist.AdaBelief, adabelief_package, {"lr": 1e-2}, adabelief_value),
    "adabelief-unrectified": (fasthist.AdaBelief, adabelief_package, {"lr": 1e-2, "rectify": False}, adabelief_value),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_low_precision_matches_reference_step_for_step(case, dtype, use_backend):
    use_backend("torch")
    ours_cls, ref_cls, kw, value = CASES[case]
    if dtype == torch.float16 and case.startswith("adam") and not case.startswith("adab"):
        # torch's fp16 Adam adds eps in fp16: 1e-8 rounds to 0 and 0/0 or x/0 follow
        kw = {**kw, "eps": 1e-3}
    ours_p = make_params(dtype)
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours, ref = ours_cls(ours_p, **kw), ref_cls(ref_p, **kw)
    bins = ours.bins
    for step in range(STEPS):
        for p, q in zip(ours_p, ref_p, strict=True):
            g = grad_at(step, p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_p, ref_p, strict=True):
            assert p.dtype == dtype and bool(torch.isfinite(q).all())
            torch.testing.assert_close(p, q, **TOL[dtype])
            for key, v in ref.state[q].items():
                if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0:
                    assert ours.state[p][key].dtype == v.dtype, key  # states where torch keeps them
                    torch.testing.assert_close(ours.state[p][key], v, **TOL[dtype])
            assert torch.equal(ours.histogram(p).counts, bins.count(value(ours, p))), f"step {step}"
    assert ours.histogram(window="total").count == STEPS * sum(max(p.numel(), 1) for p in ours_p)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: fasthist.RMSprop(ps, lr=1e-3, centered=True),
        lambda ps: fasthist.Adagrad(ps, fused=True),
        lambda ps: fasthist.Adagrad(ps),
        lambda ps: fasthist.AdaBelief(ps),
        lambda ps: fasthist.Adam(ps, fused=True),
    ],
    ids=["rmsprop", "adagrad-fused", "adagrad", "adabelief", "adam-fused"],
)
def test_gradscaler_cpu_skips_overflowing_steps(make):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = make(list(model.parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(4, 5)
    counts = []
    for i in range(5):
        opt.zero_grad()
        xi = x.clone()
        if i == 2:
            xi[0, 0] = math.inf
        before = (
            [p.detach().clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()["state"]),
        )
        scaler.scale(model(xi).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        counts.append(opt.histogram(window="total").count)
        if i == 2:
            for p, b in zip(model.parameters(), before[0], strict=True):
                assert torch.equal(p.detach(), b)
            after = opt.state_dict()["state"]
            for k, st in before[1].items():
                for key, v in st.items():
                    assert torch.equal(after[k][key], v), key
    n = sum(p.numel() for p in model.parameters())
    assert counts == [n, 2 * n, 2 * n, 3 * n, 4 * n]
    assert scaler.get_scale() < 2.0**8  # the overflow was seen


# -- GPU ---------------------------------------------------------------------------------
def _cuda_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, None], ids=["fused-protocol", "host-check"])
def test_gradscaler_skip_on_cuda(fused):
    """fused=True: GradScaler hands grad_scale/found_inf to step() and the kernel masks the
    step on the device; default: GradScaler checks found_inf on the host and skips step()."""
    model = _cuda_model()
    ref = copy.deepcopy(model)
    opt = fasthist.Adam(model.parameters(), lr=1e-3, fused=fused)
    ropt = torch.optim.Adam(ref.parameters(), lr=1e-3, fused=fused)
    scaler, rscaler = torch.amp.GradScaler("cuda", init_scale=2.0**10), torch.amp.GradScaler("cuda", init_scale=2.0**10)
    g = torch.Generator(device="cuda").manual_seed(0)
    n = sum(p.numel() for p in model.parameters())
    for i in range(6):
        x = torch.randn(16, 32, device="cuda", generator=g)
        if i == 3:
            x[0, 0] = math.inf
        snapshot = ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"]))
        for m, o, s in ((model, opt, scaler), (ref, ropt, rscaler)):
            o.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = m(x).float().pow(2).mean()
            s.scale(loss).backward()
            s.step(o)
            s.update()
        if i == 3:
            for p, b in zip(model.parameters(), snapshot[0], strict=True):
                assert torch.equal(p.detach(), b)
            after = opt.state_dict()["state"]
            for k, st in snapshot[1].items():
                for key, v in st.items():
                    assert torch.equal(after[k][key], v), (k, key)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.histogram(window="total").count == 5 * n
    assert scaler.get_scale() == rscaler.get_scale() < 2.0**10


@pytest.mark.gpu
def test_bf16_params_on_cuda_match_torch():
    model = _cuda_model().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    opt, ropt = fasthist.Adam(model.parameters(), lr=1e-3), torch.optim.Adam(ref.parameters(), lr=1e-3)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(20):
        x = torch.randn(16, 32, device="cuda", generator=g, dtype=torch.bfloat16)
        for m, o in ((model, opt), (ref, ropt)):
            o.zero_grad()
            m(x).float().pow(2).mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert opt.state[p]["exp_avg_sq"].dtype == ropt.state[q]["exp_avg_sq"].dtype
        torch.testing.assert_close(p, q, **TOL[torch.bfloat16])


GRAPH_OPTIMIZERS = {
    "adam": lambda ps: fasthist.Adam(ps, lr=1e-3, capturable=True),
    "adamw-amsgrad": lambda ps: fasthist.AdamW(ps, lr=1e-3, amsgrad=True, capturable=True),
    "rmsprop-centered-momentum": lambda ps: fasthist.RMSprop(ps, lr=1e-4, centered=True, momentum=0.9, capturable=True),
    "rmsprop-tensor-lr": lambda ps: fasthist.RMSprop(ps, lr=torch.tensor(1e-4, device="cuda"), capturable=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GRAPH_OPTIMIZERS))
def test_cuda_graph_captures_a_full_training_step(name):
    """torch.cuda.graph over forward, backward and opt.step() with capturable=True: every
    replay updates parameters as eager execution does and records a new histogram."""
    eager_model, graph_model = _cuda_model(), _cuda_model()
    eager_opt = GRAPH_OPTIMIZERS[name](eager_model.parameters())
    opt = GRAPH_OPTIMIZERS[name](graph_model.parameters())
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [(torch.randn(16, 32, device="cuda", generator=g), torch.randn(16, 8, device="cuda", generator=g))]
    batches += [
        (torch.randn(16, 32, device="cuda", generator=g), torch.randn(16, 8, device="cuda", generator=g))
        for _ in range(9)
    ]
    n = sum(p.numel() for p in graph_model.parameters())

    def step(model, o, x, y):
        o.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        o.step()

    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    warmup = 3  # on a side stream, as torch.cuda.graph requires; these are real steps
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step(graph_model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    # The grads stay allocated and are zeroed inside the graph: their addresses are the
    # warm-up's, so the kernels' cached pointer tables need no host-to-device copy during
    # capture, and every replay starts from zero instead of accumulating.
    with torch.cuda.graph(graph):
        step(graph_model, opt, static_x, static_y)

    for _ in range(warmup):
        step(eager_model, eager_opt, *batches[0])
    totals = []
    for x, y in batches[1:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        step(eager_model, eager_opt, x, y)
        torch.cuda.synchronize()
        totals.append(opt.histogram(window="total").count)
        q_graph = opt.quantiles([0.02, 0.5, 0.98])[1]
        q_eager = eager_opt.quantiles([0.02, 0.5, 0.98])[1]
        torch.testing.assert_close(q_graph, q_eager, rtol=2.05 * opt.bins.relative_accuracy, atol=0.0)
    assert totals == [(warmup + i) * n for i in range(1, len(batches))]
    for p, q in zip(graph_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
