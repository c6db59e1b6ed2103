"""Histograms across processes: counts are mergeable, so a global histogram is a sum.

The only question is *what* to sum. Two layouts of optimizer state occur in practice:

- **Replicated** (DDP, or any data parallelism that all-reduces gradients before the
  step): every rank holds the same √v̂ for the same tensor. Summing would count each
  tensor world-size times, so a replicated tensor contributes once, from the lowest rank
  that holds it.
- **Sharded** (FSDP2 ``fully_shard``, DTensor parameters, tensors split by hand): each
  rank holds a disjoint piece of the tensor, and the global histogram is the sum of the
  pieces: exactly the histogram of the whole tensor, since binning is per element.
  A DTensor whose placements also replicate over some mesh dimensions (HSDP:
  ``(Replicate(), Shard(0))``) contributes only from the ranks at coordinate 0 of those
  dimensions, so each shard is still counted once.

The default (``sharded=None``) tells them apart per tensor: a parameter that is a DTensor
with a ``Shard`` placement is sharded, everything else is replicated. That is right for
DDP, FSDP2, DTensor tensor parallelism and for ZeRO-style optimizers that own whole
tensors per rank (a tensor held by one rank only is counted once either way, provided
names identify tensors across ranks: give the optimizer named parameters). Pass
``sharded=True`` when plain local tensors are pieces of a larger tensor (manual
sharding), ``sharded=False`` to treat DTensor shards as replicas.

Rows are matched across ranks by name (``"{group}.{index}"`` or the parameter names
given to the optimizer); the result has the union of names, in rank order of first
appearance. Every query with a ``process_group`` is a collective: call it on every rank
of the group. The group must span the DTensor meshes it merges (normally it is the
default group, or the mesh's own group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .bins import LogBins
from .dtensor import is_dtensor
from .histogram import Histogram, invalid_rows

__all__ = ["all_reduce", "global_rows", "is_sharded"]


def _collective_device(group: Any, fallback: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL needs the current CUDA device."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def _check_same_bins(bins: LogBins, group: Any, device: torch.device) -> None:
    world = dist.get_world_size(group)
    spec = torch.tensor(bins.spec, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(spec) for _ in range(world)]
    dist.all_gather(gathered, spec, group=group)
    specs = [tuple(int(x) for x in s.tolist()) for s in gathered]
    if any(s != specs[0] for s in specs):
        detail = ", ".join(f"rank {r}: LogBins{s}" for r, s in enumerate(specs))
        raise ValueError(f"cannot merge histograms with different bins across ranks ({detail})")


def all_reduce(hist: Histogram, group: Any = None) -> Histogram:
    """The histogram of the values of every rank together: counts summed over ``group``.

    A collective: every rank of ``group`` must call it. All ranks must use equal
    :class:`LogBins` (checked first, ``ValueError`` on every rank otherwise). This is the
    sharded merge: for replicated values (every rank holding the same tensor) it counts
    them world-size times; the optimizer queries with ``process_group=`` choose per
    tensor. ``hist`` is not modified. A sum past int64 raises ``ValueError`` on every rank.
    """
    if not isinstance(hist, Histogram):
        raise TypeError(f"all_reduce expects a fasthist.Histogram, but got {type(hist).__name__}")
    device = _collective_device(group, hist.counts.device)
    _check_same_bins(hist.bins, group, device)
    counts = hist.counts.to(device=device, copy=True)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    if bool(invalid_rows(counts.unsqueeze(0))[0]):  # every rank's counts are valid: the sum wrapped
        raise ValueError("all_reduce: the histograms of the ranks together overflow int64")
    return Histogram(counts.to(hist.counts.device), hist.bins, validate=False)


def _dtensor_placements(t: Tensor) -> tuple[Any, Any] | None:
    """``(placements, device_mesh)`` of a DTensor, else None (no import cost otherwise)."""
    if not is_dtensor(t):
        return None
    return t.placements, t.device_mesh


def is_sharded(param: Tensor) -> bool:
    """The default rule: a DTensor with at least one ``Shard`` placement is sharded."""
    info = _dtensor_placements(param)
    if info is None:
        return False
    return any(p.is_shard() for p in info[0])


def _primary_shard_holder(param: Tensor) -> bool:
    """Whether this rank's piece of a sharded tensor is counted: always for a plain tensor,
    for a DTensor only at coordinate 0 of every mesh dimension it is not sharded over."""
    info = _dtensor_placements(param)
    if info is None:
        return True
    placements, mesh = info
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not in the mesh: it holds nothing of the tensor
        return False
    return all(c == 0 for c, p in zip(coord, placements, strict=True) if not p.is_shard())


def _merged_shape(param: Tensor, sharded: bool | None) -> tuple[int, ...] | None:
    """The shape every rank holding ``param``'s name must agree on: the tensor's (a DTensor's
    is the global shape); None for a plain tensor merged as a shard, whose pieces differ."""
    if (is_sharded(param) if sharded is None else sharded) and not is_dtensor(param):
        return None
    return tuple(param.shape)


def _check_same_shapes(gathered: list[Any]) -> None:
    """Refuse one name for tensors of different shapes on different ranks (on every rank:
    ``gathered`` is the same everywhere). Merged as one tensor, one rank's counts would be
    dropped (replicas) or added to another tensor's (shards) without a word."""
    first: dict[str, tuple[int, tuple[int, ...]]] = {}
    for r, (rank_names, _, shapes) in enumerate(gathered):
        for name, shape in zip(rank_names, shapes, strict=True):
            if shape is None:
                continue
            r0, shape0 = first.setdefault(name, (r, shape))
            if shape != shape0:
                raise ValueError(
                    f"cannot merge histograms across ranks: {name!r} is a tensor of shape {shape0} on rank {r0} "
                    f"and of shape {shape} on rank {r}; a name must identify one tensor on every rank (unnamed "
                    "parameters are named by position, '{group}.{index}': give the optimizer "
                    "model.named_parameters())"
                )


def global_rows(
    names: Sequence[str],
    params: Sequence[Tensor],
    counts: Tensor | None,
    bins: LogBins,
    group: Any = None,
    sharded: bool | None = None,
) -> tuple[list[str], Tensor]:
    """Merge per-tensor rows (``counts`` [R, num_bins], row ``i`` the tensor ``params[i]``
    named ``names[i]``) across ``group``: ``(union of names, int64 [U, num_bins])``, the same
    on every rank. ``sharded``: see the module docstring. A collective."""
    if sharded not in (None, True, False):
        raise ValueError(f"Invalid sharded value: {sharded!r}; expected None, True or False")
    rank = dist.get_rank(group)
    local_device = counts.device if counts is not None else torch.device("cpu")
    device = _collective_device(group, local_device)
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    shapes = [_merged_shape(p, sharded) for p in params]
    dist.all_gather_object(gathered, (list(names), bins.spec, shapes), group=group)
    specs = [s for _, s, _ in gathered]
    if any(tuple(s) != bins.spec for s in specs):
        detail = ", ".join(f"rank {r}: LogBins{tuple(s)}" for r, s in enumerate(specs))
        raise ValueError(f"cannot merge histograms with different bins across ranks ({detail})")
    _check_same_shapes(gathered)
    union: list[str] = []
    first_holder: dict[str, int] = {}
    for r, (rank_names, _, _) in enumerate(gathered):
        for n in rank_names:
            if n not in first_holder:
                first_holder[n] = r
                union.append(n)
    position = {n: i for i, n in enumerate(union)}
    merged = torch.zeros(len(union), bins.num_bins, dtype=torch.int64, device=device)
    if counts is not None and len(names):
        keep_rows, dest = [], []
        for i, (n, p) in enumerate(zip(names, params, strict=True)):
            shard = is_sharded(p) if sharded is None else sharded
            contributes = _primary_shard_holder(p) if shard else first_holder[n] == rank
            if contributes:
                keep_rows.append(i)
                dest.append(position[n])
        if keep_rows:
            rows = torch.tensor(keep_rows, dtype=torch.int64, device=counts.device)
            merged.index_copy_(
                0, torch.tensor(dest, dtype=torch.int64, device=device), counts.index_select(0, rows).to(device)
            )
    dist.all_reduce(merged, op=dist.ReduceOp.SUM, group=group)
    return union, merged.to(local_device)
