"""A step that refuses its input changes nothing: with two param groups whose second one
fails, neither the first group's parameters, nor any state (the lazily created one
included), nor any histogram differs from before the call, compared exactly
(``torch.equal``, dtypes and key sets too). Each probe is a way a step can fail after the
first group would have run: torch's ``_init_group`` refusing a gradient, hyper-parameters
and GradScaler flags a backend reads as one value, state torch's functional refuses, an
interrupt during the lazy initialisation or the first build of the compiled CPU library.

A failure while the calls run (a backend raising in the middle of a step) cannot be
undone without copying every tensor at every step: there the test pins what is promised
instead, the calls before it applied whole and the failing one's step counts unchanged.
"""

from __future__ import annotations

import copy
import inspect
import shutil

import pytest
import torch
from _optim_db import OPTIMS

import fasthist
from fasthist import csrc

SPARSE_REFUSED = [info for info in OPTIMS if info.sparse_error is not None]


def _snapshot(opt):
    """Every parameter, every state entry and both histogram windows, copied."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {
        id(p): {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in st.items()}
        for p, st in opt.state.items()
    }
    windows = {}
    for window in ("step", "total"):
        rows = opt.histogram_rows(window)
        windows[window] = (rows.names, None if rows.counts is None else rows.counts.clone())
    return params, state, windows


def _assert_equal_tensors(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), what


def _assert_unchanged(before, after):
    (params0, state0, windows0), (params1, state1, windows1) = before, after
    for i, (a, b) in enumerate(zip(params0, params1, strict=True)):
        _assert_equal_tensors(a, b, f"parameter {i}")
    assert state0.keys() == state1.keys(), "state entries created or dropped"
    for key, st in state0.items():
        assert st.keys() == state1[key].keys()
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                _assert_equal_tensors(v, state1[key][k], f"state {k!r}")
            else:
                assert v == state1[key][k], f"state {k!r}"
    for window, (names, counts) in windows0.items():
        names1, counts1 = windows1[window]
        assert names == names1
        assert (counts is None) == (counts1 is None)
        if counts is not None:
            _assert_equal_tensors(counts, counts1, f"{window} window")


def _two_groups(cls=fasthist.Adam, second=None, *, warm=True, **kw):
    """An optimizer over two groups (the second with the options ``second``), stepped once
    when ``warm`` (so there are counts to lose), with fresh gradients."""
    g = torch.Generator().manual_seed(0)
    first = [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]
    later = [torch.randn(6, generator=g).requires_grad_(), torch.randn(2, 2, generator=g).requires_grad_()]
    opt = cls([{"params": first}, {"params": later, **(second or {})}], **kw)
    for _ in range(2 if warm else 1):
        for p in first + later:
            p.grad = torch.randn(p.shape, generator=g)
        if warm:
            opt.step()
            warm = False
    return opt, first, later


def _refused(opt, exc, match):
    before = _snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step()
    _assert_unchanged(before, _snapshot(opt))


# -- refused while planning: nothing written ---------------------------------------------
@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "later_step"])
@pytest.mark.parametrize("info", SPARSE_REFUSED, ids=lambda info: info.name)
def test_sparse_gradient_in_a_later_group(info, warm):
    """torch's ``_init_group`` refuses it; on the first step the first group's state was
    already created (lazily) and must go again."""
    opt, _, later = _two_groups(info.cls, warm=warm)
    later[0].grad = later[0].grad.to_sparse()
    _refused(opt, RuntimeError, info.sparse_error)


@pytest.mark.parametrize("info", SPARSE_REFUSED, ids=lambda info: info.name)
def test_empty_entries_read_before_a_first_step_that_fails_stay_empty(info):
    """``opt.state[p]`` read before the first step (logging code does) leaves an empty entry;
    the lazy initialisation fills such entries in place, and a step refused while planning
    empties them again, as it drops the entries it created."""
    opt, first, later = _two_groups(info.cls, warm=False)
    for p in (first[0], later[1]):
        assert opt.state[p] == {}  # the defaultdict makes the entries
    later[0].grad = later[0].grad.to_sparse()
    _refused(opt, RuntimeError, info.sparse_error)
    assert list(opt.state) == [first[0], later[1]] and all(st == {} for st in opt.state.values())


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused"])
def test_tensor_lr_of_two_values_in_a_later_group(fused):
    """torch's Adam read it only after stepping the group's first tensor (and every
    tensor of the groups before)."""
    opt, _, _ = _two_groups(fused=fused)
    opt.param_groups[1]["lr"] = torch.tensor([1e-3, 1e-3])
    _refused(opt, RuntimeError, r"lr must be a float or a one-element Tensor, but got shape \(2,\)")


@pytest.mark.parametrize("info", OPTIMS, ids=lambda info: info.name)
def test_tensor_lr_of_no_value_any_optimizer(info):
    opt, _, _ = _two_groups(info.cls)
    opt.param_groups[1]["lr"] = torch.tensor([])
    _refused(opt, RuntimeError, r"lr must be a float or a one-element Tensor, but got shape \(0,\)")


@pytest.mark.parametrize(
    ("option", "value", "exc", "match"),
    [
        ("betas", (torch.tensor([0.9, 0.9]), 0.999), RuntimeError, r"beta1 must be .* but got shape \(2,\)"),
        ("eps", "1e-8", TypeError, "eps must be a float or a one-element Tensor, but got '1e-8'"),
        ("weight_decay", torch.tensor([[0.1]] * 2), RuntimeError, r"weight_decay must be .* shape \(2, 1\)"),
    ],
    ids=["beta1", "eps", "weight_decay"],
)
def test_hyper_parameter_set_after_construction(option, value, exc, match):
    """Group options are checked by the constructor only; torch's functional reads them
    tensor by tensor, after the groups before (and the group's first tensors) stepped."""
    opt, _, _ = _two_groups()
    opt.param_groups[1][option] = value
    _refused(opt, exc, match)


@pytest.mark.parametrize("track_first", [False, True], ids=["first_untracked", "both_tracked"])
def test_found_inf_of_two_values(track_first):
    """GradScaler's flag, set as it sets it on a fused optimizer: torch's fused Adam applies
    the update, then fails subtracting the flag from the step counts."""
    opt, _, _ = _two_groups(second={"track": True}, fused=True)
    opt.param_groups[0]["track"] = track_first
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.zeros(2)
    _refused(opt, RuntimeError, r"found_inf must be None or a one-element Tensor, but got shape \(2,\)")


def _mismatched(opt, param, kind):
    """``param``'s first state tensor shaped like it, replaced by one of another ``kind``:
    "shape" (another number of elements too, which no form accepts) or "dtype"."""
    st = opt.state[param]
    key = next(k for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor) and v.shape == param.shape)
    st[key] = torch.zeros(param.numel() + 1) if kind == "shape" else st[key].double()
    return key


@pytest.mark.parametrize("kind", ["shape", "dtype"])
@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"fused": True}], ids=["default", "foreach", "fused"])
@pytest.mark.parametrize("info", OPTIMS, ids=lambda info: info.name)
def test_state_not_matching_its_parameter_in_a_later_group(info, flags, kind):
    """A state written by hand (or another model's state dict loaded) that no longer has its
    parameter's shape or dtype: torch's for-loop form fails on it after stepping every
    tensor before it, its foreach form after incrementing the step counts and writing the
    first moments; here nothing is written (every backend: the compiled fused CPU op and the
    Triton kernels check every tensor first, torch's forms are checked before they run)."""
    for flag in flags:
        if flag not in inspect.signature(info.cls).parameters:
            pytest.skip(f"{info.name} has no {flag} option")
    opt, _, later = _two_groups(info.cls, **flags)
    key = _mismatched(opt, later[1], kind)
    # torch's forms (fasthist's words) name the state; the compiled op says its list index
    what = r"shape \(5,\)|Float \[5\]" if kind == "shape" else r"dtype torch.float64|got Double"
    _refused(opt, (RuntimeError, TypeError), rf"{key}s?\[1\] has ({what})|tensor 1 of every list .*({what})")


@pytest.mark.parametrize("kind", ["shape", "dtype"])
def test_state_not_matching_its_parameter_in_a_later_group_triton(kind):
    """The same on the Triton kernels (the interpreter here): they check their tensors
    before they write, but only when their call runs, after the first group's."""
    pytest.importorskip("triton")
    with fasthist.backend.use("triton"):
        opt, _, later = _two_groups()
        assert {c.backend for c in opt.backends().values()} == {"triton"}, opt.backends()
        key = _mismatched(opt, later[1], kind)
        what = r"shape \(5,\)" if kind == "shape" else r"dtype torch.float64"
        _refused(opt, RuntimeError, rf"{key}s\[1\] has {what}")


def test_step_count_that_is_not_a_tensor():
    """torch's functional refuses it (its words), after the groups before it ran."""
    opt, _, later = _two_groups()
    opt.state[later[1]]["step"] = 1
    _refused(opt, RuntimeError, "`state_steps` argument must contain a list of singleton tensors")


def test_capturable_group_on_the_cpu():
    """torch's Adam asserts capturable's devices when it reaches the group's first tensor."""
    opt, _, _ = _two_groups(second={"capturable": True}, warm=False)
    _refused(opt, AssertionError, "If capturable=True, params and state_steps must be on supported devices")


def test_interrupt_during_a_later_groups_state_initialisation(monkeypatch):
    """Ctrl-C while the second group's state is created on the first step: the first
    group's state, created just before, goes too."""
    opt, _, later = _two_groups(warm=False)
    original = torch.optim.Adam._init_group

    def interrupted(self, group, params, *lists):
        out = original(self, group, params, *lists)
        if any(p is later[0] for p in params):
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(torch.optim.Adam, "_init_group", interrupted)
    _refused(opt, KeyboardInterrupt, None)


def test_interrupt_while_the_compiled_library_loads(monkeypatch):
    """Ctrl-C during the first build of the compiled CPU library, which the first tracked
    group on the CPU starts: an untracked group before it must not have stepped."""
    opt, _, _ = _two_groups(warm=False)
    opt.param_groups[0]["track"] = False

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(csrc, "enabled", lambda: True)
    monkeypatch.setattr(csrc, "available", interrupted)
    _refused(opt, KeyboardInterrupt, None)


# -- a failure while the calls run -------------------------------------------------------
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_backend_failing_keeps_the_calls_before_and_its_step_counts(monkeypatch):
    """The compiled fused step raising on the second group's call (it checks its tensors
    before writing any): the first group stepped whole, the second untouched, its step
    counts included (they were incremented before the call)."""
    if not csrc.available():
        pytest.skip("the compiled CPU library did not load")
    opt, first, later = _two_groups(fused=True)
    control, _, _ = _two_groups(fused=True)
    control.param_groups[1]["params"] = []  # steps only the first group
    control.step()
    original = csrc.fused_step_

    def failing(op, lists, hist, kwargs):
        if any(p is later[0] for p in lists[0]):
            raise RuntimeError("backend failure")
        return original(op, lists, hist, kwargs)

    monkeypatch.setattr(csrc, "fused_step_", failing)
    before = _snapshot(opt)
    with pytest.raises(RuntimeError, match="backend failure"):
        opt.step()
    assert {choice.backend for choice in opt.backends().values()} == {"fused_cpu"}
    for p, q in zip(first, control.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["step"], control.state[q]["step"])
        assert torch.equal(opt.histogram(p).counts, control.histogram(q).counts)
    for i, p in enumerate(later, start=len(first)):
        assert torch.equal(p, before[0][i])
        for k, v in opt.state[p].items():
            assert torch.equal(v, before[1][id(p)][k]), k


# -- the plan keeps what valid steps did --------------------------------------------------
def test_a_group_stepped_for_the_first_time_after_others_keeps_their_counts():
    """The second group's first step creates its state and rebuilds the packed histogram
    buffers after the first group's targets were found; the first group's counts must land
    in the rebuilt buffers (exact against a step that ran alone)."""
    opt, first, later = _two_groups(warm=False)
    control = fasthist.Adam([p.detach().clone().requires_grad_() for p in first])
    for q, p in zip(control.param_groups[0]["params"], first, strict=True):
        q.grad = p.grad.clone()
    grads = [p.grad for p in later]
    for p in later:
        p.grad = None
    opt.step()
    control.step()
    for p, q in zip(first, control.param_groups[0]["params"], strict=True):
        q.grad = p.grad = torch.randn_like(p)
    for p, g in zip(later, grads, strict=True):
        p.grad = g
    opt.step()
    control.step()
    for p, q in zip(first, control.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
        for window in ("step", "total"):
            assert torch.equal(opt.histogram(p, window=window).counts, control.histogram(q, window=window).counts)
    assert all(opt.histogram(p, window="total").count == p.numel() for p in later)
