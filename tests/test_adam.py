"""fasthist.Adam against torch.optim.Adam on real models (MLP, conv, LSTM) under every flag
set of the table in _optim_db.py, the histograms against the exact histogram of the state,
state-dict compatibility with torch, queries, bad input. AdamW is in test_adamw.py; what
every optimizer shares (step for step on raw tensors, bad arguments, backends) is in
test_contract.py."""

import copy
import io
import math

import pytest
import torch
from _models import MODELS, loss_of, mlp, run_pair, twin
from _optim_db import ADAM_CONFIGS, adam_value
from torch import nn

import fasthist
from fasthist import LogBins

CONFIGS = ADAM_CONFIGS


def expected_step_hist(opt, p, bins=None):
    """Exact histogram of sqrt(v_hat) for p, straight from the optimizer state."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    return (bins or opt.bins).count(adam_value(opt.state[p], group))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_adam_matches_torch(kind, config):
    kw = CONFIGS[config]
    _, fh_model, _, fh_opt = run_pair(kind, lambda p: torch.optim.Adam(p, **kw), lambda p: fasthist.Adam(p, **kw))
    for p in fh_model.parameters():
        assert torch.equal(fh_opt.histogram(p).counts, expected_step_hist(fh_opt, p))


def test_total_window_is_sum_of_steps():
    model = mlp()
    opt = fasthist.Adam(model.parameters())
    expected = {id(p): 0 for p in model.parameters()}
    for _ in range(5):
        opt.zero_grad()
        loss_of(model, torch.randn(4, 12)).backward()
        opt.step()
        for p in model.parameters():
            expected[id(p)] = expected[id(p)] + expected_step_hist(opt, p)
    for p in model.parameters():
        assert torch.equal(opt.histogram(p, window="total").counts, expected[id(p)])
        assert opt.histogram(p, window="total").count == 5 * p.numel()
    opt.reset_histograms()
    assert opt.histogram(window="total").count == 0 and opt.histogram().count == 0


def test_three_param_groups():
    def groups(m):
        return [
            {"params": m[0].parameters(), "lr": 1e-2, "weight_decay": 0.1},
            {"params": m[2].parameters(), "betas": (0.5, 0.9), "amsgrad": True},
            {"params": m[4].parameters(), "eps": 1e-3, "maximize": True},
        ]

    _, _, _, opt = run_pair(
        "mlp", lambda p: torch.optim.Adam(p, lr=1e-3), lambda p: fasthist.Adam(p, lr=1e-3), group_fn=groups
    )
    assert list(opt.histograms()) == ["0.0", "0.1", "1.0", "1.1", "2.0", "2.1"]


@pytest.mark.parametrize("sched", ["step", "cosine", "onecycle"])
def test_lr_schedulers(sched):
    def make(cls):
        def f(params):
            opt = cls(params, lr=1e-2)
            if sched == "step":
                s = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
            elif sched == "cosine":
                s = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
            else:  # also cycles beta1
                s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=60)
            opt._test_sched = s
            return opt

        return f

    def after(i, ro, fo):
        ro._test_sched.step()
        fo._test_sched.step()
        assert ro.param_groups[0]["lr"] == fo.param_groups[0]["lr"]
        assert ro.param_groups[0]["betas"] == fo.param_groups[0]["betas"]

    run_pair("conv", make(torch.optim.Adam), make(fasthist.Adam), after_step=after)


def test_closure_and_none_grads():
    torch.manual_seed(0)
    a = mlp()
    b = copy.deepcopy(a)
    oa, ob = torch.optim.Adam(a.parameters()), fasthist.Adam(b.parameters())
    for i in range(50):
        x = torch.randn(8, 12)
        for m, o in ((a, oa), (b, ob)):

            def closure(m=m, o=o, x=x, i=i):
                o.zero_grad()
                loss = loss_of(m, x)
                loss.backward()
                if i % 3 == 0:  # some parameters get no gradient at some steps
                    m[4].bias.grad = None
                return loss

            la = o.step(closure)
        assert la is not None
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(q, p)
        assert torch.equal(oa.state[p]["step"], ob.state[q]["step"])
    # a parameter skipped at the last step keeps the histogram of its latest update
    bias = b[4].bias
    assert torch.equal(ob.histogram(bias).counts, expected_step_hist(ob, bias))


def test_state_dict_cross_load_both_ways():
    ref_model, fh_model, data = twin("mlp")
    r, f = torch.optim.Adam(ref_model.parameters(), amsgrad=True), fasthist.Adam(fh_model.parameters(), amsgrad=True)
    g = torch.Generator().manual_seed(3)
    for i in range(60):
        x = data(g)
        for m, o in ((ref_model, r), (fh_model, f)):
            o.zero_grad()
            loss_of(m, x).backward()
            o.step()
        if i == 20:  # torch -> fasthist
            f2 = fasthist.Adam(fh_model.parameters(), amsgrad=True)
            f2.load_state_dict(copy.deepcopy(r.state_dict()))  # as after torch.save/load: torch aliases otherwise
            f = f2
        if i == 40:  # fasthist -> torch
            r2 = torch.optim.Adam(ref_model.parameters(), amsgrad=True)
            r2.load_state_dict(copy.deepcopy(f.state_dict()))
            r = r2
    for p, q in zip(ref_model.parameters(), fh_model.parameters(), strict=True):
        assert torch.equal(q, p)
    # fasthist's histograms restarted from zero at step 20 (torch has none) and count every step since
    assert f.histogram(window="total").count == 39 * sum(p.numel() for p in fh_model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hist_counts_survive_save_load(dtype):
    model = mlp().to(dtype)
    opt = fasthist.Adam(model.parameters(), eps=1e-4)
    for _ in range(3):
        opt.zero_grad()
        loss_of(model, torch.randn(4, 12, dtype=dtype)).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # plain tensors and ints only
    opt2 = fasthist.Adam(model.parameters(), eps=1e-4)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for window in ("step", "total"):
            assert torch.equal(opt2.histogram(p, window=window).counts, opt.histogram(p, window=window).counts)
        assert opt2.state[p]["exp_avg"].dtype == dtype
    assert opt2.histograms(window="total").keys() == opt.histograms(window="total").keys()
    # and training continues identically from the loaded state
    x = torch.randn(4, 12, dtype=dtype)
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    o1, o2 = fasthist.Adam(m1.parameters(), eps=1e-4), fasthist.Adam(m2.parameters(), eps=1e-4)
    o1.load_state_dict(opt.state_dict())
    o2.load_state_dict(sd)
    for m, o in ((m1, o1), (m2, o2)):
        loss_of(m, x).backward()
        o.step()
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert o1.histogram(window="total") == o2.histogram(window="total")


def test_loading_histograms_recorded_with_other_bins_fails():
    model = mlp()
    opt = fasthist.Adam(model.parameters(), bins=LogBins(mantissa_bits=3))
    loss_of(model, torch.randn(2, 12)).backward()
    opt.step()
    other = fasthist.Adam(model.parameters())
    with pytest.raises(ValueError, match="recorded with LogBins"):
        other.load_state_dict(opt.state_dict())


def test_deepcopy_and_named_parameters():
    model = mlp()
    opt = fasthist.Adam(model.named_parameters())
    loss_of(model, torch.randn(2, 12)).backward()
    opt.step()
    assert list(opt.histograms()) == [n for n, _ in model.named_parameters()]
    assert opt.histograms()["0.weight"] == opt.histogram(model[0].weight) == opt.histogram("0.weight")
    clone = copy.deepcopy(opt)
    assert clone.histogram(window="total").count == opt.histogram(window="total").count


def test_quantiles_batched_equal_per_tensor():
    model = mlp()
    opt = fasthist.Adam(model.named_parameters())
    for _ in range(3):
        opt.zero_grad()
        loss_of(model, torch.randn(8, 12)).backward()
        opt.step()
    qs = [0.0, 0.02, 0.5, 0.98, 1.0]
    for window in ("step", "total"):
        names, q = opt.quantiles(qs, window=window, exclude_zeros=True)
        assert q.shape == (len(names), len(qs)) and q.dtype == torch.float64
        hists = opt.histograms(window=window)
        for name, row in zip(names, q, strict=True):
            assert torch.equal(row, hists[name].quantile(qs, exclude_zeros=True))


def test_eps_range_against_sort():
    # the paper's rule computed by sorting the real sqrt(v_hat) values, zeros excluded
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[2].bias.fill_(-10.0)  # some dead ReLU units: zero gradients downstream
    opt = fasthist.Adam(model.named_parameters())
    for _ in range(10):
        opt.zero_grad()
        model(torch.randint(0, 10, (16, 4))).pow(2).mean().backward()  # rows 10..49 never used
        opt.step()
    res = opt.eps_range()
    lows, highs = [], []
    for (name, p), row in zip(model.named_parameters(), res.rows, strict=True):
        st = opt.state[p]
        c = torch.tensor((1 - 0.999 ** float(st["step"])) ** 0.5, dtype=torch.float32)
        a = torch.sort((st["exp_avg_sq"].double().sqrt().float() / c).reshape(-1)).values
        a = a[a != 0]
        assert row.name == name and row.nonzero == a.numel()
        if a.numel() == 0:
            continue
        lo, hi = float(a[math.floor(0.02 * a.numel())]), float(a[min(math.floor(0.98 * a.numel()), a.numel() - 1)])
        assert row.low == pytest.approx(lo, rel=res.relative_accuracy)
        assert row.high == pytest.approx(hi, rel=res.relative_accuracy)
        lows.append(lo)
        highs.append(hi)
    assert res.rows[0].nonzero < res.rows[0].numel  # the embedding's unused rows are excluded
    if not res.ambiguous:
        assert res.low == 10.0 ** round(math.log10(min(lows)))
        assert res.high == 10.0 ** round(math.log10(max(highs)))
    assert res.candidates[0] == res.low and res.candidates[-1] == res.high
    assert res.to_dict()["rows"][0]["name"] == "0.weight"


def test_track_false_records_nothing():
    model = mlp()
    opt = fasthist.Adam(model.parameters(), track=False)
    loss_of(model, torch.randn(2, 12)).backward()
    opt.step()
    assert opt.histograms() == {}
    assert not opt._hist_store().counts
    groups = [{"params": model[0].parameters(), "track": False}, {"params": model[2].parameters()}]
    opt = fasthist.Adam(groups)
    opt.step()
    assert list(opt.histograms()) == ["1.0", "1.1"]


def test_nan_and_inf_gradients():
    torch.manual_seed(0)
    a = torch.randn(10, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    oa, ob = torch.optim.Adam([a]), fasthist.Adam([b])
    g = torch.randn(10)
    g[3], g[7] = math.nan, math.inf
    a.grad, b.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    torch.testing.assert_close(b, a, equal_nan=True)
    assert bool(torch.isnan(b[3]))
    h = ob.histogram()
    assert h.count == 10 and h.nonfinite_count == 2


def test_empty_zero_dim_noncontiguous_frozen():
    empty = torch.zeros(0, 3, requires_grad=True)
    scalar = torch.tensor(1.5, requires_grad=True)
    tview = torch.randn(5, 3).t().requires_grad_()  # a non-contiguous leaf
    frozen = torch.randn(4, requires_grad=False)
    params = [empty, scalar, tview, frozen]
    refs = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    assert not tview.is_contiguous()
    fo, ro = fasthist.Adam(params), torch.optim.Adam(refs)
    for _ in range(3):
        for ps, o in ((params, fo), (refs, ro)):
            torch.manual_seed(1)
            for p in ps:
                if p.requires_grad:
                    p.grad = torch.randn_like(p)
            o.step()
    for p, q in zip(params, refs, strict=True):
        assert torch.equal(p, q)
    hs = fo.histograms()
    assert [h.count for h in hs.values()] == [0, 1, 15]
    assert torch.equal(fo.histogram(tview).counts, expected_step_hist(fo, tview))
    with pytest.raises(KeyError, match="not tracked"):
        fo.histogram(frozen)


def test_gradscaler_skip_leaves_everything_untouched():
    p = torch.randn(6, requires_grad=True)
    opt = fasthist.Adam([p], fused=True)
    p.grad = torch.randn(6)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    p.grad = torch.randn(6)
    opt.grad_scale = torch.tensor(2.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p, before[0])
    for k, v in before[1].items():
        assert torch.equal(opt.state[p][k], v), k
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert not torch.equal(p, before[0])
    assert opt.histogram(window="total").count == 12


def test_gradscaler_end_to_end_cpu():
    torch.manual_seed(0)
    a = mlp()
    b = copy.deepcopy(a)
    oa, ob = torch.optim.Adam(a.parameters(), fused=True), fasthist.Adam(b.parameters(), fused=True)
    sa, sb = torch.amp.GradScaler("cpu", init_scale=4.0), torch.amp.GradScaler("cpu", init_scale=4.0)
    for i in range(8):
        x = torch.randn(4, 12)
        if i == 3:
            x[0, 0] = math.inf  # an overflowing step: skipped by both
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            o.zero_grad()
            s.scale(loss_of(m, x)).backward()
            s.step(o)
            s.update()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(q, p)
    assert ob.histogram(window="total").count == 7 * sum(p.numel() for p in b.parameters())


# -- bad input -------------------------------------------------------------------------
def test_bad_queries_and_backend(monkeypatch):
    # bad constructor arguments, parameters and sparse gradients: test_contract.py
    p = torch.zeros(2, requires_grad=True)
    opt = fasthist.Adam([p])
    with pytest.raises(ValueError, match="Invalid window: 'last'"):
        opt.histogram(window="last")
    with pytest.raises(RuntimeError, match="take an optimizer step first"):
        opt.eps_range()
    monkeypatch.setenv("FASTHIST_BACKEND", "cuda")
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="Invalid FASTHIST_BACKEND: 'cuda'"):
        opt.step()


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["defaults", "amsgrad", "fused", "decoupled", "tensor_lr"])
def test_capturable_on_cuda_matches_torch(config):
    kw = dict(CONFIGS[config], capturable=True)
    kw.pop("fused", None)
    torch.manual_seed(0)
    a = mlp().cuda()
    b = copy.deepcopy(a)
    if isinstance(kw.get("lr"), torch.Tensor):
        kw["lr"] = kw["lr"].cuda()
    oa, ob = torch.optim.Adam(a.parameters(), **kw), fasthist.Adam(b.parameters(), **kw)
    for _ in range(20):
        x = torch.randn(8, 12, device="cuda")
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            loss_of(m, x).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)  # the kernel's rounding may differ from torch's
        assert torch.equal(ob.histogram(q).counts, expected_step_hist(ob, q))


@pytest.mark.gpu
def test_step_never_synchronizes_on_cuda():
    model = mlp().cuda()
    opt = fasthist.Adam(model.parameters(), capturable=True)
    loss_of(model, torch.randn(4, 12, device="cuda")).backward()
    opt.step()  # lazy init may allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.histogram(window="total").count == 4 * sum(p.numel() for p in model.parameters())


def test_changing_sets_of_stepped_params_do_not_accumulate_caches():
    # mixture-of-experts-like: a different subset of parameters has gradients each step
    params = [torch.randn(100, requires_grad=True) for _ in range(12)]
    opt = fasthist.Adam(params)
    g = torch.Generator().manual_seed(0)
    steps = torch.zeros(12, dtype=torch.int64)
    for _ in range(60):
        mask = torch.rand(12, generator=g) < 0.5
        for p, m in zip(params, mask.tolist(), strict=True):
            p.grad = torch.randn(100, generator=g) if m else None
        opt.step()
        steps += mask
    store = opt.__dict__["_fh_store"]
    assert len(store.targets) <= 8
    for p, n in zip(params, steps.tolist(), strict=True):
        if n:
            assert opt.histogram(p, window="total").count == 100 * n
            assert torch.equal(opt.histogram(p).counts, expected_step_hist(opt, p))


def test_reset_after_load_and_track_survives_torch_state():
    model = mlp()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "track": False}]
    opt = fasthist.Adam(groups)
    ref = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    loss_of(model, torch.randn(2, 12)).backward()
    opt.step()
    ref.step()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.reset_histograms()
    assert opt.histogram().count == 0 and opt.histogram(window="total").count == 0
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch's groups carry no "track"
    assert [g["track"] for g in opt.param_groups] == [True, False]


def test_eps_range_outside_the_bins_is_flagged():
    p = torch.zeros(4, requires_grad=True)
    opt = fasthist.Adam([p], bins=LogBins(-20, 2, 5))
    p.grad = torch.tensor([1e-9, 1e-8, 1e3, 1e4])  # after one step sqrt(v_hat) = |g|
    opt.step()
    with pytest.warns(UserWarning, match="outside the histogram range"):
        res = opt.eps_range()
    assert res.ambiguous and res.high == 10.0 ** round(math.log10(4.0))  # the range bound 2**2, not 1e4


def test_bins_beyond_the_kernels_run_on_the_reference():
    pytest.importorskip("triton")
    from fasthist import backend

    kernels = backend.kernels_module(interpret=True)
    if kernels is None or not backend.interpreting():
        pytest.skip("kernels not importable under the interpreter in this process")
    fine = LogBins(-40, 10, 8)
    assert fine.num_bins > kernels.MAX_BINS
    p = torch.randn(64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    a, b = fasthist.Adam([p], bins=fine), torch.optim.Adam([q])
    p.grad, q.grad = torch.ones(64), torch.ones(64)
    with backend.use("triton"), pytest.warns(UserWarning, match="run on another backend"):
        a.step()
    b.step()
    (choice,) = a.backends().values()
    assert choice.backend != backend.TRITON and "bins, more than the kernels take" in choice.reason
    assert torch.equal(p, q)
    assert torch.equal(a.histogram(p).counts, expected_step_hist(a, p))
