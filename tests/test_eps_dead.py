"""Bounds attributed to tensors, numerically dead values flagged and excludable.

The models are the cases that motivate the flag: a Linear bias right before BatchNorm and the key
bias of attention (gradients exactly zero in exact arithmetic, rounding noise in float32:
flagged), a fused q/k/v bias as in GPT-2's ``c_attn`` (its key third dead), a live tensor
whose gradients are 1000x smaller than the rest (not flagged) and an embedding with unused
rows (exact zeros, dropped as the paper says, not flagged)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fasthist
from fasthist.eps import DEAD_RATIO


class BiasBeforeBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.fc(x))))


class Attention(nn.Module):
    """Separate q/k/v projections with biases, a fused qkv one, a branch scaled by 1e-3 (live
    but small) and an embedding of 50 rows of which the batches use 40."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.small = nn.Linear(d, d)
        self.out = nn.Linear(d, 50)

    @staticmethod
    def attend(q, k, v):
        return F.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v

    def forward(self, x):
        h = self.emb(x)
        h = h + self.attend(self.q(h), self.k(h), self.v(h))
        h = h + self.attend(*self.qkv(h).chunk(3, dim=-1))
        return self.out(h + 1e-3 * self.small(h))


def bn_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(5)]
    return BiasBeforeBN(), batches, lambda m, b: F.cross_entropy(m(b[0]), b[1])


def attention_case():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 40, (8, 12), generator=g) for _ in range(5)]
    return Attention(), batches, lambda m, b: F.cross_entropy(m(b[:, :-1]).reshape(-1, 50), b[:, 1:].reshape(-1))


def rows(res):
    return {r.name: r for r in res.rows}


def test_bias_before_batchnorm_is_flagged_and_sets_the_low_bound():
    model, batches, loss = bn_case()
    res = fasthist.estimate_eps_range(model, batches, loss, progress=False)
    r = rows(res)
    assert res.dead == ["fc.bias"] and r["fc.bias"].dead == r["fc.bias"].nonzero == 16
    # the paper's range (the default) is set by it, many decades below the others
    assert res.low_tensor == "fc.bias" and res.low_decades > 5
    assert res.low_raw == r["fc.bias"].low and res.paper.low == res.low
    assert res.dead_floor == pytest.approx(DEAD_RATIO * 10 ** sorted(math.log10(x.high) for x in res.rows)[3], rel=0.5)
    # without it: the range of the live tensors, stated beside the paper's
    assert res.without_dead is not None and res.without_dead.low >= res.low * 1e4
    assert res.without_dead.low_tensor != "fc.bias"
    dropped = fasthist.estimate_eps_range(model, batches, loss, progress=False, drop_dead=True)
    assert (dropped.low, dropped.high) == (res.without_dead.low, res.without_dead.high)
    assert dropped.paper == res.paper and dropped.drop_dead
    excluded = fasthist.estimate_eps_range(model, batches, loss, progress=False, exclude="fc.bias")
    assert (excluded.low, excluded.high) == (dropped.low, dropped.high) and excluded.excluded == ["fc.bias"]
    assert excluded.without_dead is None  # no dead value left among the counted tensors


def test_attention_key_biases_flagged_small_live_tensor_and_unused_rows_not():
    model, batches, loss = attention_case()
    res = fasthist.estimate_eps_range(model, batches, loss, progress=False)
    r = rows(res)
    assert r["k.bias"].dead == r["k.bias"].nonzero == 16  # softmax cancels it: all noise
    assert r["qkv.bias"].dead == 16 and r["qkv.bias"].nonzero == 48  # its key third
    assert r["small.weight"].dead == 0 and r["small.bias"].dead == 0  # live, 1000x smaller
    assert r["emb.weight"].dead == 0 and r["emb.weight"].nonzero == 40 * 16  # 10 unused rows: zeros
    assert set(res.dead) == {"k.bias", "qkv.bias"}
    assert res.low_tensor in ("k.bias", "qkv.bias")
    # dropping the dead values keeps the live two thirds of qkv.bias
    dropped = fasthist.estimate_eps_range(model, batches, loss, progress=False, drop_dead=True)
    assert dropped.low > res.low * 1e3 and dropped.low_tensor not in ("k.bias",)


@pytest.mark.parametrize(
    "exclude",
    ["k.bias", ["k.bias", "qkv.bias"], "*k*.bias", lambda name: name.endswith("k.bias") or name.startswith("qkv")],
)
def test_exclude_forms(exclude):
    model, batches, loss = attention_case()
    res = fasthist.estimate_eps_range(model, batches, loss, progress=False, exclude=exclude)
    assert "k.bias" in res.excluded and all(r.excluded == (r.name in res.excluded) for r in res.rows)
    assert res.low_tensor not in res.excluded and res.high_tensor not in res.excluded
    assert res.paper.low <= res.low


def test_exclude_checked_before_the_pass():
    model, batches, loss = attention_case()
    drawn = []

    def gen():
        for b in batches:
            drawn.append(1)
            yield b

    with pytest.raises(ValueError, match="matches no tensor"):
        fasthist.estimate_eps_range(model, gen(), loss, progress=False, exclude=["k.bais"])
    with pytest.raises(TypeError, match="exclude"):
        fasthist.estimate_eps_range(model, gen(), loss, progress=False, exclude=[3])
    assert drawn == []
    with pytest.raises(ValueError, match="no tensor"):
        fasthist.estimate_eps_range(model, batches, loss, progress=False, exclude="*")


def test_to_dict_is_json_and_carries_attribution():
    model, batches, loss = bn_case()
    d = fasthist.estimate_eps_range(model, batches, loss, progress=False).to_dict()
    json.dumps(d, allow_nan=False)
    assert d["low_tensor"] == "fc.bias" and d["dead"] == ["fc.bias"]
    assert d["paper"]["low_tensor"] == "fc.bias" and d["without_dead"]["low_tensor"] != "fc.bias"
    assert next(r for r in d["rows"] if r["name"] == "fc.bias")["dead_share"] == 1.0


def test_optimizer_eps_range_takes_exclude_and_drop_dead():
    """opt.eps_range() gives the same ranges as estimate_eps_range for the same counts."""
    model, batches, loss = bn_case()
    opt = fasthist.Adam(model.parameters(), lr=0.0)
    for b in batches:
        opt.zero_grad()
        loss(model, b).backward()
        opt.step()
    paper = opt.eps_range(window="total")
    assert paper.dead and paper.without_dead is not None
    dropped = opt.eps_range(window="total", drop_dead=True)
    assert (dropped.low, dropped.high) == (paper.without_dead.low, paper.without_dead.high)
    excluded = opt.eps_range(window="total", exclude=paper.dead)
    assert excluded.excluded == paper.dead and (excluded.low, excluded.high) == (dropped.low, dropped.high)
    with pytest.raises(ValueError):
        opt.eps_range(exclude="no.such.tensor*")
