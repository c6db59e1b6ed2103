"""Histogram storage: every tracked tensor's rows, kept by the optimizer beside its state.

A :class:`HistogramStore` holds, per parameter, its int64 ``[num_bins]`` rows under the keys
of :data:`ROW_KEYS`: ``hist_step``/``hist_total`` (the "step" and "total" windows of √v̂) and,
for the tensors of groups that track it, ``staleness_step``/``staleness_total``. The rows of
the tensors tracked now are rows of two packed ``[R, num_bins]`` buffers per device, so a
backend updates all of a group's histograms in one call and a query reads all rows at once.

The rows are not in ``optimizer.state[p]``: that holds exactly what torch's optimizer keeps
(``step``, the moments), so code that compares or copies state entries, PyTorch's own
optimizer tests among it, sees torch's state. ``state_dict()`` adds each parameter's rows to
its saved state entry, each count as its 8 bytes in its own tensor (:func:`saved_rows`: exact
through torch's cast to a parameter's dtype, so they survive a trip through the
``torch.optim`` optimizer a fasthist one replaces, which keeps unknown keys as they are);
``load_state_dict()`` lifts them out again (:func:`split_saved_counts`,
:func:`loadable_counts`) and puts them here, replacing every row held before. Pickling and
``copy.deepcopy`` of the optimizer keep them too.

A row belongs to its parameter's state entry: a parameter whose state entry is gone
(deleted, or a failed first step) loses its rows at the next query or step, and one whose
entry was made anew (``del optimizer.state[p]``, ``optimizer.state[p].clear()``, a new
``optimizer.state``, then a step) starts from zero, as its ``step`` does. The store tells a
new entry by its ``step`` tensor: torch's optimizers increment it in place, so another
tensor there means the entry was replaced; only then is its value read (one host read, on
that rare path), and an entry replaced with one that has stepped (state moved to another
device by a framework) keeps its counts. The rows of a parameter whose group stops
tracking it are kept, each in its own tensor, and packed again, counts and all, if the
group tracks it again.

Cost: two int64 rows of ``bins.num_bins`` per tracked tensor whatever its size (41.5 KB with
the default 2,596 bins), in memory and in a saved state dict, plus one scratch row per device.

Staleness (``track=("sqrt_v", "staleness")``, :mod:`fasthist.health`) has its own rows,
packed like √v̂'s and indexed by the same row numbers (the target's ``staleness``
windows). On a device where any tensor tracks staleness the staleness buffers have as many
rows as √v̂'s, so the memory cost there is two more rows per tracked tensor of that device
(41.5 KB each by default, whether its group tracks staleness or not), plus one scratch row;
a saved state dict holds them only for the tensors that track staleness. The backends' own
workspace for staleness (:mod:`fasthist.reference.staleness`) is one float32 value per
element of the tensors stepped together (float64 for float64 tensors).

Writing the rows. :meth:`HistogramQueries.histogram_rows` returns the packed buffer itself
(a view) where one device holds every row. Any torch op on it is safe (``zero_()``,
``copy_()``). A write that torch does not see, through ``.data``, ``.numpy()``, DLPack or a
raw pointer, is not: on the CPU the compiled pass clears, in each step row, only the bins it
wrote at the previous step, trusting the step buffer's version counter to say that nothing
else wrote the row since (every torch op bumps it; such writes do not). Nonzero counts
written that way outside those bins stay in the "step" row, added to every later step's
counts, until a torch op writes the buffer (the "total" window is not affected: it is only
ever added to). Zeroing a row that way is harmless. After such a write, call
``opt.reset_histograms()`` or bump the counter by one torch op, e.g. ``rows.counts.add_(0)``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .bins import LogBins
from .histogram import invalid_rows
from .target import DeviceTargets, HistTarget

__all__ = [
    "HIST_KEYS",
    "ROW_KEYS",
    "STALENESS_KEYS",
    "WINDOWS",
    "HistogramStore",
    "loadable_counts",
    "saved_rows",
    "split_saved_counts",
]

HIST_KEYS = ("hist_step", "hist_total")
"""The keys of the two windows of √v̂, in the order of :data:`WINDOWS`."""
STALENESS_KEYS = ("staleness_step", "staleness_total")
"""The keys of the two windows of the staleness, in the order of :data:`WINDOWS`."""
ROW_KEYS = HIST_KEYS + STALENESS_KEYS
"""Every key of a histogram row (in the store, and in a saved state entry)."""
_KEYS = {"sqrt_v": HIST_KEYS, "staleness": STALENESS_KEYS}
WINDOWS = ("step", "total")
_MAX_TARGETS = 8

Tracked = list[tuple[str, Tensor]]
"""Every tracked parameter with state, with its name, in the optimizer's order."""
_NO_ENTRY: dict = {}
Rows = dict[Tensor, dict[str, Tensor]]
"""Histogram rows by parameter, then by key of :data:`ROW_KEYS`: int64 ``[num_bins]``."""


class HistogramStore:
    """Every parameter's histogram rows (:attr:`counts`) and their packing: per device,
    packed buffers and the param -> row map, rebuilt (keeping every count) when the set of
    tracked parameters changes. Rows are ordered device by device, so ``cat`` of the
    buffers lines up with ``params``/``names``."""

    def __init__(self, bins: LogBins, counts: Rows | None = None) -> None:
        self.bins = bins
        #: the rows of every parameter that has any: a row of the packed buffers for the
        #: tensors packed now, its own tensor otherwise (loaded, or not tracked now)
        self.counts: Rows = dict(counts or {})
        #: the ``step`` of each parameter's state entry when its rows were last packed (not
        #: there for rows loaded since, which came with the entry they belong to)
        self.marks: dict[Tensor, Any] = {}
        self._unpack()

    def _unpack(self) -> None:
        self.params: list[Tensor] = []
        self.names: list[str] = []
        self.row: dict[Tensor, tuple[torch.device, int]] = {}
        self.packed: dict[int, Any] = {}  # id of each packed parameter -> its mark (see marks)
        self.buffers: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.scratch: dict[torch.device, tuple[Tensor, Tensor]] = {}  # the buffers with the scratch row
        # the staleness rows, where a group tracks it: same row numbers as the buffers above
        self.stale: dict[Tensor, int] = {}  # the parameters whose staleness rows are packed: their row
        self.stale_scratch: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.stale_rows: dict[torch.device, list[int]] = {}
        # per set of parameters stepped together (usually one per group); bounded, since
        # each holds workspace and the set can change every step (experts, frozen branches)
        self.targets: OrderedDict[tuple, DeviceTargets] = OrderedDict()

    def invalidate(self) -> None:
        """Repack on next use (keeping every count): after state entries were dropped."""
        self._unpack()

    def load(self, counts: Rows) -> None:
        """Replace every row by ``counts`` (a loaded state dict's, on the parameters' devices)."""
        self.counts = dict(counts)
        self.marks = {}
        self._unpack()

    def reset(self) -> None:
        """Zero every row, packed or not."""
        for bufs in (*self.scratch.values(), *self.stale_scratch.values()):
            for buf in bufs:
                buf.zero_()
        for p, rows in self.counts.items():
            for key, t in rows.items():
                if not self._packed(p, key):
                    t.zero_()

    def _packed(self, p: Tensor, key: str) -> bool:
        return p in self.row and (key in HIST_KEYS or p in self.stale)

    def kept(self, state: Any) -> Rows:
        """Every row of a parameter that has state, each in its own tensor (pickling)."""
        return {p: {k: t.clone() for k, t in rows.items()} for p, rows in self.counts.items() if state.get(p)}

    def _valid_for(self, state: Any, params: Iterable[Tensor], staleness: bool = False) -> bool:
        # every step walks its parameters here: one tensor hash each (the state lookup);
        # the packed ones are looked up by id (held in self.params, so no id is reused)
        packed, stale = self.packed, self.stale
        for p in params:
            mark = packed.get(id(p), _NO_ENTRY)
            if mark is _NO_ENTRY or state.get(p, _NO_ENTRY).get("step") is not mark:
                return False
            if staleness and p not in stale:
                return False
        return True

    def _rebuild(self, state: Any, tracked: Tracked, stale: Tracked) -> None:
        # Every parameter with state in a tracked group gets a row, keeping the counts it has;
        # those of groups tracking staleness a staleness row too, at the same row number.
        old = {p: rows for p, rows in self.counts.items() if not self._renewed(state.get(p, _NO_ENTRY), p)}
        self._unpack()
        counts: Rows = {}
        nb = self.bins.num_bins
        stale_ids = {id(p) for _, p in stale}
        per_device: dict[torch.device, Tracked] = {}
        for name, p in tracked:
            per_device.setdefault(p.device, []).append((name, p))
        for device, items in per_device.items():
            # one row more than tracked: a tensor given twice to one step writes its first
            # pass there (never read), so it is counted once per step
            shape = (len(items) + 1, nb)
            full = [torch.zeros(shape, dtype=torch.int64, device=device) for _ in WINDOWS]
            stale_full = None
            if any(id(p) in stale_ids for _, p in items):
                stale_full = [torch.zeros(shape, dtype=torch.int64, device=device) for _ in WINDOWS]
            for r, (name, p) in enumerate(items):
                kept, rows = old.get(p, {}), counts.setdefault(p, {})
                _place(kept, rows, full, r, HIST_KEYS)
                if stale_full is not None and id(p) in stale_ids:
                    _place(kept, rows, stale_full, r, STALENESS_KEYS)
                    self.stale[p] = r
                    self.stale_rows.setdefault(device, []).append(r)
                self.row[p] = (device, r)
                self.params.append(p)
                self.names.append(name)
            self.buffers[device] = (full[0][: len(items)], full[1][: len(items)])
            self.scratch[device] = (full[0], full[1])
            if stale_full is not None:
                self.stale_scratch[device] = (stale_full[0], stale_full[1])
        # rows not packed now (a group that stopped tracking, or staleness): kept, each in its
        # own tensor, while their parameter has state
        for p, kept in old.items():
            if not state.get(p):
                continue
            rows = counts.setdefault(p, {})
            for key, t in kept.items():
                if key not in rows:
                    rows[key] = t.clone()
        self.counts = counts
        self.marks = {p: state[p].get("step") for p in counts}
        self.packed = {id(p): self.marks[p] for p in self.params}

    def _renewed(self, entry: dict, p: Tensor) -> bool:
        """Whether ``p``'s state ``entry`` was made anew since its rows were packed: another
        ``step`` than then, which has not stepped (read only here, on that rare path)."""
        if p not in self.marks:  # loaded (or unpickled) with the entry they belong to
            return False
        step = entry.get("step")
        if step is self.marks[p]:
            return False
        if step is None:
            return True
        return float(step) == 0

    def targets_for(
        self,
        state: Any,
        tracked: Callable[[], tuple[Tracked, Tracked]],
        params: list[Tensor],
        staleness: bool = False,
    ) -> DeviceTargets:
        """Where one step call over ``params`` (all with state, in tracked groups) writes:
        per device, (their indices, the target), with the staleness windows when
        ``staleness``. ``tracked()`` (every tracked tensor, and those tracking staleness)
        is read only to rebuild."""
        if not self._valid_for(state, params, staleness):
            self._rebuild(state, *tracked())
        key = (staleness, *map(id, params))
        cached = self.targets.get(key)
        if cached is not None:
            self.targets.move_to_end(key)
            return cached
        by_device: dict[torch.device, list[int]] = {}
        last = {id(p): i for i, p in enumerate(params)}  # a tensor given twice counts at its last place
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        out = {}
        for device, idx in by_device.items():
            step, total = self.scratch[device]
            scratch = step.shape[0] - 1
            row = [self.row[params[i]][1] if last[id(params[i])] == i else scratch for i in idx]
            rows = torch.tensor(row, dtype=torch.int64, device=device)
            stale = self.stale_scratch[device] if staleness else None
            out[device] = (idx, HistTarget(self.bins, step, total, rows, staleness=stale))
        self.targets[key] = out
        if len(self.targets) > _MAX_TARGETS:
            self.targets.popitem(last=False)
        return out

    def rows(
        self, state: Any, tracked: Tracked, stale: Tracked, window: str, quantity: str = "sqrt_v"
    ) -> tuple[list[str], list[Tensor], Tensor | None]:
        """``(names, params, counts)``: every row of ``quantity`` ("sqrt_v" or "staleness")
        in ``window`` ("step" or "total") as one ``[R, num_bins]`` matrix (None when nothing
        is tracked), a view where one device holds them all (and, for staleness, every
        tracked tensor of it tracks staleness)."""
        if window not in WINDOWS:
            raise ValueError(f"Invalid window: {window!r}; expected 'step' or 'total'")
        if quantity not in _KEYS:
            raise ValueError(f"Invalid quantity: {quantity!r}; expected one of {tuple(_KEYS)}")
        stale_set = {p for _, p in stale}
        if (
            {p for _, p in tracked} != set(self.params)
            or stale_set != self.stale.keys()
            or not self._valid_for(state, self.params)
        ):
            self._rebuild(state, tracked, stale)
        i = WINDOWS.index(window)
        if quantity == "sqrt_v":
            names, params = self.names, self.params
            mats = [bufs[i] for bufs in self.buffers.values()]
        else:
            names = [n for n, p in zip(self.names, self.params, strict=True) if p in stale_set]
            params = [p for p in self.params if p in stale_set]
            mats = [self._stale_mat(device, i) for device in self.stale_rows]
        if not mats:
            return [], [], None
        counts = torch.cat([m.to(mats[0].device) for m in mats]) if len(mats) > 1 else mats[0]
        return names, params, counts

    def _stale_mat(self, device: torch.device, window: int) -> Tensor:
        """The staleness rows of ``device`` in ``window`` (index into :data:`WINDOWS`): a view
        where they are the first rows in order, else a copy."""
        rows, buf = self.stale_rows[device], self.stale_scratch[device][window]
        if rows == list(range(len(rows))):
            return buf[: len(rows)]
        return buf.index_select(0, torch.tensor(rows, dtype=torch.int64, device=device))


def _place(kept: dict[str, Tensor], rows: dict[str, Tensor], bufs: list[Tensor], r: int, keys: tuple[str, ...]) -> None:
    """Row ``r`` of ``bufs`` under ``keys`` of ``rows``, holding the counts ``kept`` has."""
    for buf, key in zip(bufs, keys, strict=True):
        old = kept.get(key)
        if old is not None:
            buf[r].copy_(old)
        rows[key] = buf[r]


_BYTE_SHIFTS = tuple(range(0, 64, 8))


def saved_rows(rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """The int64 rows of one parameter as a state dict holds them: each count as its 8 bytes,
    least significant first, ``uint8 [num_bins, 8]`` (the same 8 bytes per bin as int64).

    torch's ``load_state_dict`` casts every tensor of a parameter's state to the parameter's
    dtype (a fasthist state dict loaded into the torch optimizer it replaces): int64 counts would be
    rounded past 256 in bf16, past 2048 in fp16 (and become inf past 65,504), past 2**24 in
    float32. Every float type holds 0..255 exactly, so bytes come back exact from any of
    them (:func:`loadable_counts`). Each row is a new tensor: saving one writes its own
    counts, not the packed buffer it is a row of."""
    out = {}
    for key, t in rows.items():
        shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.int64, device=t.device)
        out[key] = ((t.unsqueeze(-1) >> shifts) & 255).to(torch.uint8)
    return out


def _from_bytes(t: Tensor) -> Tensor | None:
    """The int64 counts of a ``[num_bins, 8]`` row of :func:`saved_rows`, in any real dtype
    torch may have cast it to; None if it does not hold bytes (whole numbers 0..255)."""
    x = t.detach().to(torch.float64) if t.is_floating_point() else t.detach()
    if not bool(((x >= 0) & (x <= 255) & (x == x.floor() if x.is_floating_point() else True)).all()):
        return None  # NaN and inf fail the range test
    shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.int64, device=t.device)
    return (x.to(torch.int64) << shifts).sum(dim=-1)  # a top byte >= 128 reads negative: refused as such


def split_saved_counts(saved_state: dict[Any, Any]) -> tuple[dict[Any, Any], dict[Any, dict[str, Tensor]]]:
    """A saved optimizer ``state`` without the histogram rows, and the rows by parameter
    key: torch's ``load_state_dict`` would cast them to the parameter's dtype."""
    hists: dict[Any, dict[str, Tensor]] = {}
    stripped = {}
    for k, v in saved_state.items():
        if isinstance(v, dict) and any(h in v for h in ROW_KEYS):
            hists[k] = {h: v[h] for h in ROW_KEYS if h in v}
            v = {kk: vv for kk, vv in v.items() if kk not in ROW_KEYS}
        stripped[k] = v
    return stripped, hists


def _row_counts(t: Any, num_bins: int) -> tuple[Tensor | None, bool]:
    """``(int64 counts or None to drop, whether a float cast may have rounded them)`` of a
    saved row: bytes ``[num_bins, 8]`` (:func:`saved_rows`) or counts ``[num_bins]``."""
    if not isinstance(t, Tensor) or t.is_complex() or t.dtype == torch.bool:
        return None, False
    if t.shape == (num_bins, 8):
        return _from_bytes(t), False
    if t.shape != (num_bins,):
        return None, False
    if not t.is_floating_point():  # integer types hold their counts exactly
        return t.to(torch.int64), False
    x = t.detach().to(torch.float64)
    if not bool((torch.isfinite(x) & (x >= 0) & (x == x.floor()) & (x < 2.0**63)).all()):
        return None, False
    return x.to(torch.int64), bool((x > 2.0 / torch.finfo(t.dtype).eps).any())


def loadable_counts(hists: dict[Any, dict[str, Tensor]], num_bins: int) -> dict[Any, dict[str, Tensor]]:
    """The saved rows of :func:`split_saved_counts` as int64 counts, to load.

    Rows as :func:`saved_rows` writes them (bytes) load exactly from any real dtype; int64
    ``[num_bins]`` rows (older checkpoints, or written by hand) as they are. Either must be
    counts: a negative count, or a total past int64, raises ``ValueError`` (before anything
    is loaded). ``[num_bins]`` rows of a float dtype (older checkpoints that went through
    ``torch.optim``, which casts them to the parameter's dtype) are brought back where they
    hold whole numbers ``>= 0``, with one warning where they exceed the float type's exact
    integers (2**24 for float32), since the cast may have rounded them; rows that are not
    counts are dropped, with one warning for all of them.
    """
    out: dict[Any, dict[str, Tensor]] = {}
    dropped: list[str] = []
    rounded: list[str] = []
    for k, rows in hists.items():
        for key, t in rows.items():
            where = f"{key} of parameter {k}"
            counts, inexact = _row_counts(t, num_bins)
            if counts is None:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                dropped.append(f"{where} ({got})")
                continue
            if inexact:
                rounded.append(f"{where} ({t.dtype})")
            if bool(invalid_rows(counts.unsqueeze(0))[0]):
                problem = "negative counts" if bool((counts < 0).any()) else "counts whose total overflows int64"
                raise ValueError(f"loaded {where} is not a histogram: it holds {problem}")
            out.setdefault(k, {})[key] = counts
    if dropped:
        more = "..." if len(dropped) > 4 else ""
        warnings.warn(
            f"fasthist: dropping {len(dropped)} saved histograms that are not counts (not whole numbers "
            f">= 0, or not [{num_bins}] or [{num_bins}, 8] rows): {', '.join(dropped[:4])}{more}",
            stacklevel=3,
        )
    if rounded:
        more = "..." if len(rounded) > 4 else ""
        warnings.warn(
            f"fasthist: {len(rounded)} saved histograms were cast to a float type and hold counts past its "
            f"exact integers; loaded as they are, possibly rounded: {', '.join(rounded[:4])}{more}",
            stacklevel=3,
        )
    return out
