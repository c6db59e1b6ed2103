"""Nothing lost, nothing silently wrong: every tensor has one
name and one histogram, counts are exact integers that never wrap or go negative, a
non-zero value never lands in the zero bin, a finite one never in the non-finite bin,
and histograms survive a detour through ``torch.optim``. Errors name the argument, the
value received and what is allowed."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from _optim_db import OPTIMS, grads_at, make_params

import fasthist
from fasthist import Histogram, LogBins
from fasthist.histogram import batched_quantile

by_optim = pytest.mark.parametrize("info", OPTIMS, ids=lambda info: info.name)
BINS = LogBins()
NB = BINS.num_bins


def step_all(opt, params, step=0):
    for p, g in zip(params, grads_at(step, params), strict=True):
        p.grad = g
    opt.step()


# -- a name identifies one tensor, a tensor has one name ------------------------------------------
@by_optim
def test_duplicate_names_refused(info):
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match=r"duplicate parameter name 'w'.*param group 0.*parameters 0 and 1"):
        info.cls([("w", a), ("w", b)])
    opt = info.cls([("w", a)])
    with pytest.raises(ValueError, match=r"duplicate parameter name 'w'.*param group 1.*already names"):
        opt.add_param_group({"params": [("w", b)]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [("v", b)]})  # a fresh name is fine
    assert [g["param_names"] for g in opt.param_groups] == [["w"], ["v"]]


TORCH_OPTIMS = [info for info in OPTIMS if info.name != "adabelief"]


def _construct(make, *args, **kwargs):
    """``make(*args, **kwargs)`` and the warnings it gave, as (category, text)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = make(*args, **kwargs)
    return opt, [(w.category, str(w.message)) for w in record]


@pytest.mark.parametrize(
    ("info", "config"),
    [pytest.param(info, c, id=f"{info.name}-{c}") for info in TORCH_OPTIMS for c in info.configs],
)
def test_same_tensor_twice_in_a_group_steps_like_torch(info, config):
    # torch warns and steps the tensor twice per step (its state too); so do we, and the
    # tensor has one histogram, counted once per step (at its last place, its final value)
    kw = info.configs[config]
    a, b = make_params()[:2]
    a2, b2 = (p.detach().clone().requires_grad_() for p in (a, b))
    ours, ours_warned = _construct(info.cls, [a, b, a], **kw)
    theirs, their_warned = _construct(info.reference, [a2, b2, a2], **kw)
    assert ours_warned == their_warned
    assert [c for c, _ in ours_warned] == [UserWarning]
    for step in range(4):
        step_all(ours, [a, b], step)
        step_all(theirs, [a2, b2], step)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    for p, q in ((a, a2), (b, b2)):
        for key, t in theirs.state[q].items():
            assert torch.equal(ours.state[p][key], t), key
    assert list(ours.histograms()) == ["0.0", "0.1"]
    group = ours.param_groups[0]
    assert torch.equal(ours.histogram(a).counts, BINS.count(info.value(ours.state[a], group)))
    assert ours.histogram(a, window="total").count == 4 * a.numel()
    with pytest.raises(KeyError, match=r"given twice in param group 0; its histogram is named '0\.0'"):
        ours.histogram("0.2")


@pytest.mark.parametrize("info", TORCH_OPTIMS, ids=repr)
def test_same_tensor_in_two_groups_refused_like_torch(info):
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    for groups in ([{"params": [a]}, {"params": [b, a]}], [{"params": [("w", a)]}, {"params": [("w", a)]}]):
        for make in (info.cls, info.reference):
            with pytest.raises(ValueError, match=r"^some parameters appear in more than one parameter group$"):
                make(groups)


@pytest.mark.parametrize("info", TORCH_OPTIMS, ids=repr)
def test_named_tensor_twice_in_a_group_warns_like_torch(info):
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    ours, warned = _construct(info.cls, [("w", a), ("v", b), ("w", a)])
    assert warned == _construct(info.reference, [("w", a), ("v", b), ("w", a)])[1]
    step_all(ours, [a, b])
    assert list(ours.histograms()) == ["w", "v"]
    with pytest.raises(ValueError, match=r"duplicate parameter name 'w'.*parameters 0 and 2"):
        info.cls([("w", a), ("v", b), ("w", torch.zeros(3, requires_grad=True))])


@by_optim
def test_load_state_dict_with_duplicate_names_refused(info):
    params = make_params()
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    opt = info.cls(named)
    step_all(opt, params)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["param_names"][1] = "p0"
    before = {n: h.counts.clone() for n, h in opt.histograms().items()}
    with pytest.raises(ValueError, match=r"duplicate parameter name 'p0'"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["param_names"] == ["p0", "p1", "p2", "p3"]
    assert {n: h.counts for n, h in opt.histograms().items()}.keys() == before.keys()


# -- reset_histograms resets every group ----------------------------------------------------------
@by_optim
def test_reset_covers_untracked_groups(info):
    params = make_params()
    opt = info.cls([{"params": params[:2]}, {"params": params[2:]}])
    for step in range(3):
        step_all(opt, params, step)
    opt.param_groups[1]["track"] = False
    opt.reset_histograms()
    opt.param_groups[1]["track"] = True
    step_all(opt, params, 3)
    for p in params:  # the total window covers the steps since the reset: one
        assert opt.histogram(p, window="total") == opt.histogram(p, window="step")


# -- ranks computed exactly -----------------------------------------------------------------------
def _two_bins(c0: int, c1: int, i: int = 1000, j: int = 1500) -> Histogram:
    counts = torch.zeros(NB, dtype=torch.int64)
    counts[i], counts[j] = c0, c1
    return Histogram(counts, BINS)


def test_quantile_rank_beyond_2_53():
    h = _two_bins(2**53 + 2, 1)  # n = 2**53 + 3: float64(q * n) rounds up past the last element
    reps = BINS.representatives
    assert h.quantile(1.0) == float(reps[1500])
    assert h.quantile(0.0) == float(reps[1000])
    q = batched_quantile(h.counts.unsqueeze(0), torch.tensor([1.0], dtype=torch.float64), BINS)
    assert float(q[0, 0]) == float(reps[1500])


def _rank(q: float, m: int) -> int:
    """min(floor(q * m), m) with the product rounded once to float64: Python's int / int is
    correctly rounded."""
    num, den = q.as_integer_ratio()
    return min(math.floor((num * m) / den), m)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("huge", [False, True], ids=["n<=2**53", "n>2**53"])
def test_ranks_are_the_once_rounded_product(seed, huge):
    """Random n and q (q down to 2**-70): the returned bin is the one holding the order
    statistic of the rank computed with Python's exact integers, under the rank rule
    a[min(floor(q*n), n-1)], for totals n and n-1.
    For n <= 2**53 that is plain float64 arithmetic (numpy's and torch's convention)."""
    g = np.random.default_rng(seed)
    qs = [float(x) for x in g.random(40)] + [0.0, 1.0, 2.0**-70, 1 - 2.0**-53, 0.5, 0.98, 0.02, 2.0**-63]
    top = 2**62 if huge else 2**52
    for _ in range(20):
        c0 = int(g.integers(1, top))
        c1 = int(g.integers(1, top))
        for n in (c0 + c1, c0 + c1 - 1):  # the products q*n and q*(n-1) of the two former rules
            h = _two_bins(c0, n - c0)
            got = batched_quantile(h.counts.unsqueeze(0), torch.tensor(qs, dtype=torch.float64), BINS)[0]
            for q, r in zip(qs, got.tolist(), strict=True):
                k = min(_rank(q, n), n - 1)
                if not huge:
                    assert k == min(math.floor(q * n), n - 1)
                want = BINS.representatives[1000 if k < c0 else 1500]
                assert r == float(want), (n, q, c0, c1)


def test_rank_rounding_up_to_2_63_stays_in_range():
    # n = 2**63 - 1 rounds up to 2**63 in float64: the rank is n - 1, no int64 overflow
    h = _two_bins(2**63 - 2, 1)
    assert h.quantile(1.0) == float(BINS.representatives[1500])
    assert h.quantile(1 - 2.0**-53) == float(BINS.representatives[1000])  # rank 2**63 - 1024
    assert h.quantile(0.999999) == float(BINS.representatives[1000])


# -- impossible counts refused, overflow detected -------------------------------------------------
def test_negative_counts_refused():
    counts = torch.zeros(NB, dtype=torch.int64)
    counts[7] = -1
    with pytest.raises(ValueError, match=r"Histogram counts must be nonnegative, but bin 7 holds -1"):
        Histogram(counts, BINS)


def test_counts_whose_sum_overflows_refused():
    counts = torch.zeros(NB, dtype=torch.int64)
    counts[10] = counts[20] = 2**62 + 1
    with pytest.raises(ValueError, match=r"Histogram counts must sum to less than 2\*\*63"):
        Histogram(counts, BINS)


def test_merge_overflow_detected():
    a = _two_bins(2**62, 1)
    b = _two_bins(2**62, 1)
    with pytest.raises(ValueError, match=r"cannot merge histograms: the merged counts overflow int64"):
        a + b
    with pytest.raises(ValueError, match=r"overflow int64"):
        sum([a, b])
    assert (a + _two_bins(1, 1)).count == 2**62 + 3


@by_optim
def test_negative_loaded_counts_refused(info):
    params = make_params()
    opt = info.cls(params)
    step_all(opt, params)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["hist_total"][3] = -5
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = info.cls(params2)
    with pytest.raises(ValueError, match=r"hist_total of parameter 1 .*negative"):
        opt2.load_state_dict(sd)
    assert all(int(st["step"]) == 0 for st in opt2.state.values())  # nothing loaded (Adagrad's initial state)
    assert all(h.count == 0 for h in opt2.histograms(window="total").values())


@by_optim
def test_total_window_overflow_detected(info):
    params = make_params()
    opt = info.cls(params)
    step_all(opt, params)
    sd = copy.deepcopy(opt.state_dict())
    row = torch.zeros(NB, dtype=torch.int64)  # a row of int64 counts loads as it is
    row[0] = 2**63 - 10  # loads: a valid count, but the next steps wrap it
    sd["state"][0]["hist_total"] = row
    opt.load_state_dict(sd)
    step_all(opt, params, 1)
    for query in (
        lambda: opt.histograms(window="total"),
        lambda: opt.histogram(params[0], window="total"),
        lambda: opt.quantiles(0.5, window="total"),
        lambda: opt.eps_range(window="total"),
    ):
        with pytest.raises(RuntimeError, match=r"'0\.0' .*overflowed int64.*reset_histograms"):
            query()
    assert set(opt.histograms()) == {"0.0", "0.1", "0.2", "0.3"}  # the step window is fine
    opt.reset_histograms()
    opt.histograms(window="total")


# -- histograms survive a detour through torch.optim ----------------------------------------------
@pytest.mark.parametrize("info", [i for i in OPTIMS if i.name != "adabelief"], ids=repr)
def test_histograms_survive_torch_optim(info):
    params = make_params()
    opt = info.cls(params, **info.backend_config)
    for step in range(3):
        step_all(opt, params, step)
    theirs = info.reference([p.detach().clone().requires_grad_() for p in params], **info.backend_config)
    theirs.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert theirs.state[theirs.param_groups[0]["params"][0]]["hist_total"].dtype == torch.float32  # torch's cast
    back = info.cls([p.detach().clone().requires_grad_() for p in params], **info.backend_config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back.load_state_dict(theirs.state_dict())
    for window in ("step", "total"):
        assert back.histograms(window=window) == opt.histograms(window=window)
    assert not any(key in st for st in back.state.values() for key in fasthist.store.ROW_KEYS)  # lifted out


def test_non_integral_float_counts_dropped_with_one_warning():
    params = make_params()
    opt = fasthist.Adam(params)
    step_all(opt, params)
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        for key in ("hist_step", "hist_total"):
            s[key] = s[key].float() + 0.5
    sd["state"][0]["hist_total"] = sd["state"][0]["hist_total"].floor()  # integral: loads
    back = fasthist.Adam([p.detach().clone().requires_grad_() for p in params])
    with pytest.warns(UserWarning, match=r"dropping 7 saved histograms .*not whole numbers") as record:
        back.load_state_dict(sd)
    assert len(record) == 1
    h = back.histogram(back.param_groups[0]["params"][0], window="total")
    assert h == opt.histogram(params[0], window="total")
    assert back.histogram(back.param_groups[0]["params"][1], window="total").count == 0


# -- the rows are kept beside the state, and kept through what users do ---------------------------
@by_optim
def test_counts_kept_while_a_group_stops_tracking(info):
    # a group that stops tracking keeps its tensors' counts (saved, reset, and packed again,
    # counts and all, when it tracks again)
    params = make_params()
    opt = info.cls([{"params": params[:2]}, {"params": params[2:]}])
    for step in range(2):
        step_all(opt, params, step)
    before = {n: h.counts.clone() for n, h in opt.histograms(window="total").items()}
    opt.param_groups[1]["track"] = False
    step_all(opt, params, 2)
    assert set(opt.histograms()) == {"0.0", "0.1"}
    sd = opt.state_dict()
    assert all("hist_total" in sd["state"][i] for i in range(4))  # the untracked group's rows saved too
    opt.param_groups[1]["track"] = True
    step_all(opt, params, 3)
    after = opt.histograms(window="total")
    for name in ("1.0", "1.1"):  # two steps before, one after: the untracked step not counted
        assert torch.equal(after[name].counts, before[name] + opt.histograms()[name].counts)


@by_optim
def test_a_parameter_whose_state_is_dropped_loses_its_rows(info):
    params = make_params()
    opt = info.cls(params)
    step_all(opt, params)
    del opt.state[params[1]]
    assert set(opt.histograms()) == {"0.0", "0.2", "0.3"}
    assert params[1] not in opt._hist_store().counts
    assert 1 not in opt.state_dict()["state"]


def _renew_by_del(opt, p):
    del opt.state[p]


def _renew_by_clear(opt, p):
    opt.state[p].clear()


def _renew_all(opt, p):
    opt.state = type(opt.state)(dict)


@by_optim
@pytest.mark.parametrize("renew", [_renew_by_del, _renew_by_clear, _renew_all], ids=lambda f: f.__name__[7:])
def test_a_state_entry_made_anew_starts_its_histograms_from_zero(info, renew):
    # no query in between: the step itself sees that the entry is new (its step restarts)
    params = make_params()
    opt = info.cls(params)
    for step in range(3):
        step_all(opt, params, step)
    renew(opt, params[1])
    step_all(opt, params, 3)
    assert int(opt.state[params[1]]["step"]) == 1
    total = opt.histogram(params[1], window="total")
    assert total == opt.histogram(params[1]) and total.count == params[1].numel()


@by_optim
def test_a_state_entry_replaced_by_a_copy_keeps_its_counts(info):
    # a framework moving state to a device (Lightning's optimizer_to_device) makes new entries
    # and new tensors, with the same values: that is not a new state
    params = make_params()
    opt = info.cls(params)
    for step in range(3):
        step_all(opt, params, step)
    for p in params:
        opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
    step_all(opt, params, 3)
    for p in params:
        assert opt.histogram(p, window="total").count == 4 * p.numel()


def test_a_pickle_with_the_rows_in_the_state_loads_them():
    # fasthist before 2026-12-03 kept the rows in optimizer.state[p], and so did its pickles
    import pickle

    params = make_params()
    opt = fasthist.Adam(params, track=("sqrt_v", "staleness"))
    for step in range(2):
        step_all(opt, params, step)
    old = copy.deepcopy(opt)
    state = old.__getstate__()
    for p, rows in state.pop("_fh_counts").items():
        state["state"][p].update(rows)
    older = object.__new__(fasthist.Adam)
    older.__setstate__(state)
    back = pickle.loads(pickle.dumps(older))
    for o in (older, back):
        assert not any(key in st for st in o.state.values() for key in fasthist.store.ROW_KEYS)
        for window in ("step", "total"):
            for quantity in ("sqrt_v", "staleness"):
                ours = o.histograms(window=window, quantity=quantity)
                assert ours == opt.histograms(window=window, quantity=quantity) and len(ours) == 4


# -- messages and types ---------------------------------------------------------------------------
def test_wrong_dtype_named():
    with pytest.raises(
        ValueError, match=r"int64 tensor of shape \(2596,\), but got a float32 tensor of shape \(2596,\)"
    ):
        Histogram(torch.zeros(NB), BINS)
    with pytest.raises(ValueError, match=r"but got a list"):
        Histogram([0] * NB, BINS)


def test_fraction_above_refuses_nan():
    h = Histogram.from_values(torch.rand(10))
    with pytest.raises(ValueError, match=r"fraction_above\(\) x must not be NaN"):
        h.fraction_above(math.nan)
    with pytest.raises(TypeError, match=r"fraction_above\(\) x must be a real number, but got str"):
        h.fraction_above("1e-8")
    with pytest.raises(TypeError, match=r"x must be a real number, but got bool"):
        h.fraction_above(True)
    assert h.fraction_above(math.inf) == 0.0
    assert h.fraction_above(np.float32(-1.0)) == 1.0


@pytest.mark.parametrize("q", [0.5, np.float64(0.5), np.float32(0.5), np.float16(0.5), 1, np.int64(0)])
def test_scalar_quantile_is_a_float(q):
    h = Histogram.from_values(torch.rand(100))
    assert type(h.quantile(q)) is float


def test_quantile_refuses_bools():
    h = Histogram.from_values(torch.rand(100))
    for q in (True, np.bool_(False), [0.5, True], torch.tensor([True])):
        with pytest.raises(
            TypeError, match=r"quantile\(\) q must be a real number or a sequence of them, but got bool"
        ):
            h.quantile(q)


@by_optim
def test_eps_range_says_why_nothing_is_tracked(info):
    p = torch.zeros(3, requires_grad=True)
    opt = info.cls([p], track=False)
    p.grad = torch.ones(3)
    opt.step()
    with pytest.raises(RuntimeError, match=r"eps_range: no param group has track=True"):
        opt.eps_range()
    opt2 = info.cls([torch.zeros(3, requires_grad=True)])
    if info.name != "adagrad":  # torch's Adagrad creates its state at construction
        with pytest.raises(RuntimeError, match=r"eps_range: no tracked parameter has been stepped yet"):
            opt2.eps_range()


@by_optim
def test_histogram_of_an_untracked_parameter_says_why(info):
    a, b, c = (torch.zeros(3, requires_grad=True) for _ in range(3))
    opt = info.cls([{"params": [a]}, {"params": [b], "track": False}])
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    with pytest.raises(KeyError, match=r"param group 1, which has track=False"):
        opt.histogram(b)
    with pytest.raises(KeyError, match=r"no tracked parameter named '1\.0'; it is in param group 1, which has track"):
        opt.histogram("1.0")
    with pytest.raises(KeyError, match=r"not a parameter of this optimizer; tracked: \['0\.0'\]"):
        opt.histogram(c)
    with pytest.raises(KeyError, match=r"no parameter has that name"):
        opt.histogram("w")
    opt.add_param_group({"params": [c]})
    if info.name != "adagrad":  # torch's Adagrad creates state when the group is added
        with pytest.raises(KeyError, match=r"no state yet \(no step taken, or it never had a gradient\)"):
            opt.histogram(c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_counts_exact_through_torch_optim_for_low_precision_params(dtype):
    # torch.optim.Adam casts a loaded state's tensors to the parameter's dtype: int64 counts
    # rounded past 256 in bf16 and became inf past 65,504 in fp16 (the whole row dropped).
    # 70,001 equal values put 70,001 (odd, past both limits) into one bin of the step window.
    p = torch.zeros(70_001, dtype=dtype, requires_grad=True)
    opt = fasthist.Adam([p])
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    assert int(opt.histogram().counts.max()) == 70_001
    theirs = torch.optim.Adam([p.detach().clone().requires_grad_()])
    theirs.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert theirs.state[theirs.param_groups[0]["params"][0]]["hist_total"].dtype == dtype  # torch's cast
    for source in (theirs.state_dict(), opt.state_dict()):  # through torch.optim, and directly
        back = fasthist.Adam([p.detach().clone().requires_grad_()])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            back.load_state_dict(copy.deepcopy(source))
        for window in ("step", "total"):
            assert torch.equal(back.histogram(window=window).counts, opt.histogram(window=window).counts)
        assert back.histogram(window="total").count == 3 * 70_001


def test_counts_rounded_by_a_narrow_float_cast_load_with_one_warning():
    # a [num_bins] row (older checkpoints) that torch.optim cast to bf16: counts past 2**8 round
    p = torch.zeros(300, dtype=torch.bfloat16, requires_grad=True)
    opt = fasthist.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for key in ("hist_step", "hist_total"):
        sd["state"][0][key] = opt.histogram(p, window=key[5:]).counts.to(torch.bfloat16)
    back = fasthist.Adam([p.detach().clone().requires_grad_()])
    with pytest.warns(UserWarning, match=r"2 saved histograms were cast to a float type .*possibly rounded") as rec:
        back.load_state_dict(sd)
    assert len(rec) == 1
    assert back.histogram(back.param_groups[0]["params"][0]).counts.dtype == torch.int64


def test_a_saved_row_is_saved_alone():
    # a row of the packed buffer would serialise the whole buffer (every tensor's counts)
    params = [torch.zeros(3, requires_grad=True) for _ in range(50)]
    opt = fasthist.Adam(params)
    step_all(opt, params)
    row = opt.state_dict()["state"][0]["hist_total"]
    assert row.untyped_storage().nbytes() == NB * 8
    counts = opt.histogram(params[0], window="total").counts
    assert torch.equal(fasthist.store.loadable_counts({0: {"r": row}}, NB)[0]["r"], counts)


def test_queries_check_only_the_rows_they_read(monkeypatch):
    # a one-tensor query checks its row; the others check a bounded number of rows at a
    # time: at 100k tensors a check of the whole matrix at once needed a 2 GB temporary
    params = [torch.zeros(2, requires_grad=True) for _ in range(600)]
    opt = fasthist.Adam(params)
    step_all(opt, params)
    checked = []
    real = fasthist.queries.invalid_rows
    monkeypatch.setattr(fasthist.queries, "invalid_rows", lambda c: checked.append(c.shape[0]) or real(c))
    assert opt.histogram(params[7]).count == 2
    assert checked == [1]
    checked.clear()
    assert len(opt.histograms()) == 600
    assert max(checked) <= 256 and sum(checked) == 600
