"""What ``eps_range`` says when there is no range (what is actually the case, not "take an
optimizer step first" after steps were taken), and what ``exclude=`` and the percentiles
accept: a tensor of NaN/inf left out, names holding glob characters taken exactly."""

from __future__ import annotations

import math

import pytest
import torch

import fasthist
from fasthist.eps import eps_range_from_counts


def test_all_zero_gradients_after_steps_are_named_as_such():
    w = torch.nn.Parameter(torch.ones(10))
    b = torch.nn.Parameter(torch.ones(3))
    opt = fasthist.Adam([("w", w), ("b", b)], lr=1e-3)
    for _ in range(3):
        w.grad, b.grad = torch.zeros(10), torch.zeros(3)
        opt.step()
    with pytest.raises(RuntimeError) as e:
        opt.eps_range()
    msg = str(e.value)
    assert "take an optimizer step first" not in msg
    assert "all 13 values" in msg and "2 tracked tensors" in msg and "exactly 0" in msg


def test_empty_histograms_are_named_as_such():
    bins = fasthist.LogBins()
    counts = torch.zeros(2, bins.num_bins, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="empty") as e:
        eps_range_from_counts(["a", "b"], counts, bins)
    assert "take an optimizer step first" not in str(e.value)


def _stepped(grads: dict[str, torch.Tensor]) -> fasthist.Adam:
    params = {n: torch.nn.Parameter(torch.zeros_like(g)) for n, g in grads.items()}
    opt = fasthist.Adam(list(params.items()), lr=1e-3)
    for n, p in params.items():
        p.grad = grads[n].clone()
    opt.step()
    return opt


def test_exclude_leaves_out_a_tensor_of_nan_and_inf():
    g = torch.Generator().manual_seed(0)
    good = torch.rand(100, generator=g) + 0.1
    bad = torch.full((50,), math.nan)
    bad[::2] = math.inf
    opt = _stepped({"good": good, "bad": bad})
    with pytest.raises(RuntimeError, match="non-finite percentiles .* in bad; exclude= leaves"):
        opt.eps_range()
    rng = opt.eps_range(exclude="bad")
    assert rng.excluded == ["bad"] and rng.low_tensor == rng.high_tensor == "good"
    assert rng.paper is None  # over every tensor, NaN included, the rule has no answer
    good_only = _stepped({"good": good}).eps_range()
    assert (rng.low_raw, rng.high_raw) == (good_only.low_raw, good_only.high_raw)


def test_exact_names_with_glob_characters():
    g = torch.Generator().manual_seed(0)
    small, large = torch.rand(20, generator=g) * 1e-6 + 1e-7, torch.rand(20, generator=g) + 1.0
    opt = _stepped({"w[0]": small, "w0": large, "w1": large})
    assert opt.eps_range(exclude="w[0]").excluded == ["w[0]"]  # the name, not the pattern (which picks w0)
    assert opt.eps_range(exclude=["w[[]0]"]).excluded == ["w[0]"]  # the documented escape
    assert opt.eps_range(exclude="w[01]").excluded == ["w0", "w1"]  # a pattern that is no name
    assert opt.eps_range(exclude="w?").excluded == ["w0", "w1"]


@pytest.mark.parametrize("bad", [dict(low=False), dict(high=True), dict(low=0.5, high=0.2)])
def test_percentiles_are_numbers_not_bools(bad):
    opt = _stepped({"w": torch.rand(10) + 0.1})
    with pytest.raises(ValueError, match="Invalid percentiles"):
        opt.eps_range(**bad)
