"""The numbers every integration logs (fasthist.integrations.metrics), against the
optimizer's own queries and an oracle over the bins' representatives."""

from __future__ import annotations

import torch

import fasthist
from fasthist.integrations.metrics import snapshot, summary_scalars, tensor_scalars


def test_adaptive_share_is_exact_over_groups_with_their_own_eps():
    # the summary's share compares every element with its own group's ε: the counts above
    # summed over the tensors, over all elements (exact), not a weighted mean of shares
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(s)) for s in (97, 31, 203))
    opt = fasthist.Adam([{"params": [a, b], "eps": 1e-3}, {"params": [c], "eps": 1e-8}], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (a.sin().sum() * 1e-3 + b.square().sum() + (c * torch.linspace(0, 1, 203)).sum()).backward()
        opt.step()
    snap = snapshot(opt)
    reps = opt.bins.representatives_on("cpu")
    eps = {"0.0": 1e-3, "0.1": 1e-3, "1.0": 1e-8}
    hists = opt.histograms()
    above = {n: int(h.counts[reps > eps[n]].sum()) for n, h in hists.items()}
    total = sum(h.count for h in hists.values())
    assert summary_scalars(snap)["adaptive"] == sum(above.values()) / total
    per_tensor = tensor_scalars(snap)
    for n, h in hists.items():
        assert per_tensor[n]["adaptive"] == h.fraction_above(eps[n]) == above[n] / h.count
