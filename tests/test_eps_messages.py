"""What ``eps_range`` says when there is no range (issue 9, item 17): what is actually the
case, not "take an optimizer step first" after steps were taken."""

from __future__ import annotations

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
