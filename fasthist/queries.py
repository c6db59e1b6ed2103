"""The queries of a fasthist optimizer, beside its step: where the histograms live (the
packed rows of :mod:`fasthist.store`), reading them (one tensor, all of them, batched
quantiles), merging them across ranks (:mod:`fasthist.distributed`) and the paper's ε rule
(:mod:`fasthist.eps`).

A query reads no more than it answers: one tensor's histogram checks and copies one row;
the overflow check and the quantiles of many rows run a bounded number of rows at a time,
so a query over 100k tensors allocates no temporary the size of the whole matrix (the
result of :meth:`HistogramQueries.histograms` is a copy of every row, one tensor each).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .bins import LogBins
from .declaration import QUANTITIES, quantities
from .eps import EpsRange, Exclude, eps_range_from_counts
from .health import RMSEstimate, rms_from_counts
from .histogram import Histogram, as_quantiles, batched_quantile, invalid_rows
from .names import tracked, why_untracked
from .store import HistogramStore

__all__ = ["HistogramQueries", "HistogramRows"]

_CHECK_ROWS = 256
"""Rows per overflow check: its running sums take 256 x num_bins int64 (5 MB by default)."""


class HistogramRows(NamedTuple):
    """Every tracked tensor's histogram in one matrix: ``counts[i]`` (int64, one row of
    ``bins.num_bins``) belongs to ``names[i]`` / ``params[i]`` (``params[i]`` is None for
    a tensor known only on another rank). ``counts`` is None when nothing is tracked."""

    names: list[str]
    params: list[Tensor | None]
    counts: Tensor | None


def _refuse_overflow(names: list[str], counts: Tensor, window: str) -> None:
    """``RuntimeError`` naming the rows of ``counts`` that are not counts (wrapped past int64)."""
    bad = torch.cat([invalid_rows(chunk) for chunk in counts.split(_CHECK_ROWS)])
    if bool(bad.any()):
        which = [names[i] for i in bad.nonzero().flatten().tolist()]
        raise RuntimeError(
            f"histogram counts of {', '.join(map(repr, which[:5]))}{'...' if len(which) > 5 else ''} "
            f"({window!r} window) overflowed int64; call reset_histograms()"
        )


class HistogramQueries:
    """Mixed into a fasthist optimizer: the histogram storage beside its state and every query.
    Requires ``self._bins``, ``self.state`` and ``self.param_groups``."""

    _bins: LogBins
    state: Any
    param_groups: list[dict[str, Any]]

    # -- storage -------------------------------------------------------------------------
    def _hist_store(self) -> HistogramStore:
        store = self.__dict__.get("_fh_store")
        if store is None:
            store = self.__dict__["_fh_store"] = HistogramStore(self._bins)
        return store

    def _tracked(self) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
        """Every tracked tensor, and those tracking staleness (what the store packs)."""
        return tracked(self.param_groups, self.state), tracked(self.param_groups, self.state, "staleness")

    def _check_quantity(self, quantity: str) -> None:
        """Refuse a quantity no param group tracks (or no such quantity)."""
        if quantity not in QUANTITIES:
            raise ValueError(f"Invalid quantity: {quantity!r}; expected one of {QUANTITIES}")
        if quantity != "sqrt_v" and not any(quantity in quantities(g["track"]) for g in self.param_groups):
            raise ValueError(
                f"Invalid quantity: {quantity!r} is not tracked by any param group; pass "
                f"track=('sqrt_v', {quantity!r}) to the optimizer or the group"
            )

    def histogram_rows(
        self,
        window: str = "step",
        *,
        quantity: str = "sqrt_v",
        process_group: Any = None,
        sharded: bool | None = None,
    ) -> HistogramRows:
        """All histograms of ``quantity`` (``"sqrt_v"`` or ``"staleness"``, see ``track``) in
        ``window`` ("step" or "total") as one ``[R, num_bins]`` int64 matrix with the tensors'
        names, without copying them off the device; with ``process_group``, merged across its
        ranks (see :meth:`histograms`). A quantity no group tracks raises ``ValueError``."""
        self._check_quantity(quantity)
        names, params, counts = self._hist_store().rows(self.state, *self._tracked(), window, quantity)
        if process_group is None:
            return HistogramRows(list(names), list(params), counts)
        from .distributed import global_rows  # torch.distributed only when asked for

        merged_names, merged = global_rows(names, params, counts, self._bins, process_group, sharded)
        if not merged_names:
            return HistogramRows([], [], None)
        local = dict(zip(names, params, strict=True))
        return HistogramRows(merged_names, [local.get(n) for n in merged_names], merged)

    def _checked_rows(
        self, window: str, process_group: Any, sharded: bool | None, quantity: str = "sqrt_v"
    ) -> HistogramRows:
        """:meth:`histogram_rows`, refusing rows whose counts wrapped past int64."""
        rows = self.histogram_rows(window, quantity=quantity, process_group=process_group, sharded=sharded)
        if rows.counts is not None:
            _refuse_overflow(rows.names, rows.counts, window)
        return rows

    # -- public queries ------------------------------------------------------------------
    @property
    def bins(self) -> LogBins:
        """The :class:`LogBins` every histogram of this optimizer uses."""
        return self._bins

    def histograms(
        self,
        *,
        window: str = "step",
        quantity: str = "sqrt_v",
        process_group: Any = None,
        sharded: bool | None = None,
    ) -> dict[str, Histogram]:
        """Histogram of every tracked tensor, by name: the names given to the optimizer
        (``model.named_parameters()``), else ``"{group}.{index}"``: ``model.parameters()``
        gives ``"0.0"``, ``"0.1"``, ... (positions, the same on every rank only where every
        rank passes the same tensors in the same order).

        ``window="step"``: values of each tensor's latest update; ``"total"``: summed over
        all steps since construction or :meth:`reset_histograms`. Copies, not views.

        ``process_group`` (every query accepts it): merge over the ranks of that group
        (``torch.distributed.group.WORLD`` for all) into global histograms, the same on
        every rank; a collective, so call it on every rank. Replicated tensors (DDP) count
        once, shards (DTensor/FSDP2) add up to the whole tensor; ``sharded`` overrides the
        per-tensor default. See :mod:`fasthist.distributed`. None (default): this rank only.

        ``quantity`` (every query accepts it): ``"sqrt_v"`` (default) or ``"staleness"``, the
        tensors of the groups tracking it (``track=("sqrt_v", "staleness")``).
        """
        names, _, counts = self._checked_rows(window, process_group, sharded, quantity)
        if counts is None:
            return {}
        # a copy per row: each histogram owns its counts (saving one writes one row)
        return {n: Histogram(c.clone(), self._bins, validate=False) for n, c in zip(names, counts, strict=True)}

    def histogram(
        self,
        param: Tensor | str | None = None,
        *,
        window: str = "step",
        quantity: str = "sqrt_v",
        process_group: Any = None,
        sharded: bool | None = None,
    ) -> Histogram:
        """Histogram of ``quantity`` of one tracked tensor (by tensor or name), or of all merged (None)."""
        if param is None:
            return self._merged_histogram(window, process_group, sharded, quantity)
        if not isinstance(param, (Tensor, str)):
            raise TypeError(f"param must be a Tensor, a str or None, but got {type(param).__name__}")
        names, order, counts = self.histogram_rows(
            window, quantity=quantity, process_group=process_group, sharded=sharded
        )
        if isinstance(param, str):
            r = names.index(param) if param in names else None
        else:
            r = next((i for i, p in enumerate(order) if p is param), None)
        if r is None:
            what = f"no tracked parameter named {param!r};" if isinstance(param, str) else "parameter is not tracked:"
            raise KeyError(f"{what} {why_untracked(self.param_groups, param, names)}")
        assert counts is not None  # a name or tensor was found among the rows
        row = counts[r : r + 1]
        _refuse_overflow([names[r]], row, window)
        return Histogram(row[0].clone(), self._bins, validate=False)

    def _merged_histogram(self, window: str, process_group: Any, sharded: bool | None, quantity: str) -> Histogram:
        """The histogram of every tracked tensor's values together."""
        names, _, counts = self._checked_rows(window, process_group, sharded, quantity)
        if counts is None:
            return Histogram.empty(self._bins)
        merged = counts.sum(dim=0)
        if bool(invalid_rows(merged.unsqueeze(0))[0]):
            raise RuntimeError(f"the {window!r} histograms of all tracked tensors together overflow int64")
        return Histogram(merged, self._bins, validate=False)

    def quantiles(
        self,
        qs: float | list[float] | Tensor,
        *,
        window: str = "step",
        quantity: str = "sqrt_v",
        exclude_zeros: bool = False,
        process_group: Any = None,
        sharded: bool | None = None,
    ) -> tuple[list[str], Tensor]:
        """Quantiles of every tracked tensor at once: ``(names, float64 [num_tensors, len(qs)])``
        on the histograms' device, computed in one batched operation (rule and guarantee
        of :class:`Histogram`)."""
        qt, _ = as_quantiles(qs)
        names, _, counts = self._checked_rows(window, process_group, sharded, quantity)
        if counts is None:
            return [], torch.empty(0, qt.numel(), dtype=torch.float64)
        chunks = counts.split(_CHECK_ROWS)  # its running sums a bounded number of rows at a time
        return names, torch.cat([batched_quantile(c, qt, self._bins, exclude_zeros=exclude_zeros) for c in chunks])

    def staleness_rms(
        self, window: str = "step", *, process_group: Any = None, sharded: bool | None = None
    ) -> tuple[list[str], RMSEstimate]:
        """Per tensor tracking staleness, its RMS staleness ``sqrt(mean(s**2))`` read off its
        histogram (:func:`fasthist.health.rms_from_counts`): ``(names, RMSEstimate)``, the
        estimate and its bounds as float64 ``[num_tensors]`` tensors on the histograms' device.

        Accuracy: ``lower <= RMS <= upper`` always; the estimate ``sqrt(lower * upper)`` is
        within a relative ``sqrt(1 + 2**-m) - 1 < 2**-(m+1)`` of the true RMS (1.55% with the
        default ``m = 5`` mantissa bits) when the tensor's below-range, above-range and
        non-finite bins are empty; below-range elements only widen ``upper`` (by at most
        ``bins.low`` each), an above-range one makes it infinite, a non-finite one makes all
        three NaN. No host sync: nothing is read back (the rows are not checked for int64
        overflow, which a "step" row cannot reach), so it can run every step; a tensor with
        nothing counted yet gives NaN. ``process_group``/``sharded``: merged across ranks
        first, as :meth:`histograms` (a collective)."""
        names, _, counts = self.histogram_rows(
            window, quantity="staleness", process_group=process_group, sharded=sharded
        )
        if counts is None:
            empty = torch.empty(0, dtype=torch.float64)
            return [], RMSEstimate(empty, empty, empty)
        parts = [rms_from_counts(c, self._bins) for c in counts.split(_CHECK_ROWS)]
        return list(names), RMSEstimate(*(torch.cat(t) for t in zip(*parts, strict=True)))

    def eps_range(
        self,
        low: float = 0.02,
        high: float = 0.98,
        *,
        window: str = "step",
        process_group: Any = None,
        sharded: bool | None = None,
        exclude: Exclude = None,
        drop_dead: bool = False,
    ) -> EpsRange:
        """The paper's ε-range rule (:mod:`fasthist.eps`) on the latest step's histograms;
        ``exclude`` (names, glob patterns or a predicate) leaves tensors out, ``drop_dead``
        the numerically dead values (:data:`fasthist.eps.DEAD_RATIO`)."""
        names, _, counts = self._checked_rows(window, process_group, sharded)
        if counts is None:
            if not any(group["track"] for group in self.param_groups):
                raise RuntimeError("eps_range: no param group has track=True, so nothing is recorded")
            raise RuntimeError(
                "eps_range: no tracked parameter has been stepped yet (no step taken, or none of them had a "
                "gradient); take an optimizer step first"
            )
        return eps_range_from_counts(
            names, counts, self._bins, low=low, high=high, exclude=exclude, drop_dead=drop_dead
        )

    def reset_histograms(self) -> None:
        """Zero both windows of both quantities of every tensor, in every group (tracked now or not)."""
        self._hist_store().reset()
