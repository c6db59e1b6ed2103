"""Shared by the integration tests: a tiny model whose optimizer has exact zeros in √v̂
(dead hidden units) and two param groups with different ε, and the oracle of what a
callback logs, computed from the optimizer's own queries."""

from __future__ import annotations

import json
import statistics
import struct
import time
from pathlib import Path

import torch
from torch import nn

import fasthist
from fasthist.histogram import batched_quantile


class Tiny(nn.Module):
    """Two linear layers; the first layer's units 0..3 are dead (bias -50 under a ReLU), so
    their weights' √v̂ are exact zeros. ``forward`` takes and returns what HF's Trainer
    passes and expects."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        with torch.no_grad():
            self.net[0].bias[:4] = -50.0

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def optimizer(model: nn.Module, track: bool | tuple[str, ...] = True) -> fasthist.Adam:
    """fasthist.Adam over ``model`` (a ``Tiny`` or a module holding one as ``.tiny``) with the
    first layer at ε=1e-3 and the second at the default 1e-8, every tensor named."""
    named = dict(model.named_parameters())
    first = [n for n in named if ".0." in n]
    second = [n for n in named if ".2." in n]
    return fasthist.Adam(
        [
            {"params": [named[n] for n in first], "param_names": first, "eps": 1e-3},
            {"params": [named[n] for n in second], "param_names": second},
        ],
        lr=1e-2,
        track=track,
    )


def staleness_optimizer(model: nn.Module) -> fasthist.Adam:
    """:func:`optimizer` tracking staleness too."""
    return optimizer(model, ("sqrt_v", "staleness"))


def expected_staleness(opt: fasthist.Adam, prefix: str = "fasthist") -> dict[str, float]:
    """The staleness metrics a HistogramCallback logs for ``opt`` now, from its own queries:
    per tensor the RMS (``staleness_rms``) and p99 of its histogram, the merged p99, and the
    median and maximum of the per-tensor RMS."""
    names, rms = opt.staleness_rms()
    hists = opt.histograms(quantity="staleness")
    out = {f"{prefix}/staleness_p99": opt.histogram(quantity="staleness").quantile(0.99)}
    values = rms.estimate.tolist()
    out[f"{prefix}/staleness_rms_median"] = statistics.median(values)
    out[f"{prefix}/staleness_rms_max"] = max(values)
    for name, value in zip(names, values, strict=True):
        out[f"{prefix}.staleness_rms/{name}"] = value
        out[f"{prefix}.staleness_p99/{name}"] = hists[name].quantile(0.99)
    return out


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def name_eps(opt: fasthist.Adam) -> dict[str, float]:
    return {n: g["eps"] for g in opt.param_groups for n in g["param_names"]}


def expected(opt: fasthist.Adam, prefix: str = "fasthist") -> dict[str, float]:
    """What a HistogramCallback logs for ``opt`` now, from ``opt``'s own queries."""
    rng, mid = opt.eps_range(), opt.eps_range(0.5, 0.5)
    merged = opt.histogram()
    q = batched_quantile(
        merged.counts[None],
        torch.tensor([0.02, 0.5, 0.98], dtype=torch.float64),
        opt.bins,
        exclude_zeros=True,
    )[0].tolist()
    hists, eps = opt.histograms(), name_eps(opt)
    above = sum(h.fraction_above(eps[n]) * h.count for n, h in hists.items())
    out = {f"{prefix}/p02": q[0], f"{prefix}/p50": q[1], f"{prefix}/p98": q[2]}
    out[f"{prefix}/adaptive"] = above / merged.count
    out.update({f"{prefix}/eps_low": rng.low, f"{prefix}/eps_high": rng.high})
    out.update({f"{prefix}/eps_low_raw": rng.low_raw, f"{prefix}/eps_high_raw": rng.high_raw})
    for row, m in zip(rng.rows, mid.rows, strict=True):
        out[f"{prefix}.p02/{row.name}"], out[f"{prefix}.p98/{row.name}"] = row.low, row.high
        out[f"{prefix}.p50/{row.name}"] = m.low
        out[f"{prefix}.adaptive/{row.name}"] = hists[row.name].fraction_above(eps[row.name])
    return out


def record_expected(opt: fasthist.Adam, oracle=expected) -> dict[int, dict[str, float]]:
    """``{step: oracle(opt)}`` after every ``opt.step()`` from now on (steps from 1)."""
    seen: dict[int, dict[str, float]] = {}
    opt.register_step_post_hook(lambda o, args, kwargs: seen.setdefault(len(seen) + 1, oracle(o)))
    return seen


def wandb_records(path):
    """The records of a W&B transaction log (.wandb: LevelDB log framing of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if pos + 7 + n > len(raw):  # a record still being written
            return
        buf, pos = buf + raw[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # full or last fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_history(run_dir, timeout: float = 30.0):
    """Every history record of the one W&B run under ``run_dir``, as {key: value}. Waits
    (at most ``timeout`` seconds) for the run's exit record: ``wandb.finish()`` can return
    before wandb-core has written the last records of an offline run."""
    (path,) = Path(run_dir).rglob("*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        recs = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out = []
    for rec in recs:
        if rec.WhichOneof("record_type") == "history":
            out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out
