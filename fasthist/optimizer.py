"""What every fasthist optimizer adds to its torch counterpart: histogram storage in the
optimizer state, and the queries (histograms, batched quantiles, the ε range).

The mixin owns ``step`` (closure, ``_init_group``, histogram targets, the call into
:mod:`fasthist.dispatch`); each optimizer supplies its :class:`~fasthist.declaration.OptimizerDecl`
and :meth:`HistogramMixin._gather`, the lists and keyword arguments of its functional form.

Storage: each tracked parameter's state holds ``hist_step`` and ``hist_total``, int64
rows of packed per-device buffers (:mod:`fasthist.store`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import _use_grad_for_differentiable

from . import dispatch
from .bins import LogBins
from .declaration import OptimizerDecl
from .dispatch import Choice
from .eps import EpsRange, Exclude, eps_range_from_counts
from .histogram import Histogram, as_quantiles, batched_quantile, invalid_rows
from .names import check_distinct_tensors, check_unique_names, tracked, why_untracked
from .store import HIST_KEYS, HistogramStore, loadable_counts, split_saved_counts

__all__ = ["HistogramMixin", "HistogramRows", "TRACKING_ARGS_DOC", "drop_in_doc"]

TRACKING_ARGS_DOC = """\
        track (bool): record histograms (default: True). A group option too: a param
            group with ``track=False`` records nothing and costs nothing.
        bins (LogBins, optional): the binning (default: ``LogBins()``, [1e-20, 1e4]
            at 1.54% relative accuracy).
"""
"""The ``Args`` entries of the arguments every fasthist optimizer adds, for class docstrings."""


def drop_in_doc(torch_name: str, value: str, note: str | None = None) -> str:
    """The class docstring of the drop-in for ``torch.optim.<torch_name>`` that histograms
    ``value``; ``note`` closes it (default: where to read about the algorithm)."""
    note = note if note is not None else f"See ``torch.optim.{torch_name}`` for the algorithm."
    return (
        f"Drop-in replacement for :class:`torch.optim.{torch_name}` that records log-binned "
        f"histograms of {value}.\n\n"
        f"    Every argument of ``torch.optim.{torch_name}`` is accepted with its meaning, defaults and\n"
        "    error messages; the extra keyword-only arguments are:\n\n"
        "    Args:\n"
        f"{TRACKING_ARGS_DOC}\n"
        "    Query with :meth:`histogram`, :meth:`histograms`, :meth:`quantiles` and\n"
        f"    :meth:`eps_range`. {note}\n"
    )


def _torch_grad_mode(step: Callable) -> Callable:
    """Run ``step`` in torch's grad mode for optimizer steps: ``_use_grad_for_differentiable``
    (gradients only with ``differentiable=True``, graph breaks for ``torch.compile``) for an
    optimizer with a ``differentiable`` option, ``torch.no_grad`` for one without."""
    differentiable = _use_grad_for_differentiable(step)
    no_grad = torch.no_grad()(step)

    @functools.wraps(step)
    def wrapper(self: Any, closure: Callable[[], Any] | None = None) -> Any:
        return (differentiable if "differentiable" in self.defaults else no_grad)(self, closure)

    return wrapper


class HistogramRows(NamedTuple):
    """Every tracked tensor's histogram in one matrix: ``counts[i]`` (int64, one row of
    ``bins.num_bins``) belongs to ``names[i]`` / ``params[i]`` (``params[i]`` is None for
    a tensor known only on another rank). ``counts`` is None when nothing is tracked."""

    names: list[str]
    params: list[Tensor | None]
    counts: Tensor | None


class HistogramMixin:
    """Mixed into a ``torch.optim`` optimizer subclass, before it in the bases. Requires
    ``self._bins`` and the group option ``track``; the subclass supplies :meth:`_gather`,
    ``declaration`` (its :class:`~fasthist.declaration.OptimizerDecl`) and ``_checks_graph_capture``."""

    _bins: LogBins
    state: Any
    param_groups: list[dict[str, Any]]
    defaults: dict[str, Any]
    # what the dispatcher needs to know about this optimizer
    declaration: OptimizerDecl
    # True where torch's counterpart checks CUDA-graph capture at the start of step
    _checks_graph_capture: bool = False

    # -- the step ------------------------------------------------------------------------
    def _gather(self, group: dict[str, Any]) -> tuple[list[list[Tensor]], dict[str, Any]]:
        """The positional lists (parameters with a gradient first) and keyword arguments
        of the functional form for ``group``, lazily initialising state as torch does."""
        raise NotImplementedError

    def _options(self, group: dict[str, Any], **more: Any) -> dict[str, Any]:
        """The declared keyword arguments (bools and floats) that ``group`` holds, under their
        own names, plus ``more`` (what the group holds otherwise, e.g. ``betas``)."""
        declared = self.declaration.bools | self.declaration.floats
        return {**{k: group[k] for k in sorted(declared) if k in group}, **more}

    def _grad_scaler_args(self) -> dict[str, Any]:
        """``grad_scale``/``found_inf`` as ``torch.amp.GradScaler`` sets them on a fused optimizer."""
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}

    @staticmethod
    def _lists(n: int) -> list[list[Tensor]]:
        return [[] for _ in range(n)]

    def _init_group(self, group: dict[str, Any], params: list[Tensor], *lists: list[Tensor]) -> Any:
        """The parent's ``_init_group`` (lazy state), then :meth:`_prepare_tracking`.

        ``torch.compile`` runs an optimizer's ``_init_group`` in Python instead of tracing it
        (dynamo's ``OptimizerVariable``) and guards on the state it leaves; so everything a
        step sets up once (state, packed histogram rows, targets, the CPU kernel's library)
        happens here, and the traced step only reads it: no recompilation on the next step."""
        ret = super()._init_group(group, params, *lists)  # type: ignore[misc]
        if group["track"] and params:
            self._prepare_tracking(params)
        return ret

    def _prepare_tracking(self, params: list[Tensor]) -> None:
        """Build (or find) the packed rows and targets of ``params`` and load the compiled
        CPU histogram where one of them is on the CPU. Idempotent, cheap when nothing changed.
        The targets are kept for the step that called ``_init_group`` (:meth:`_step_targets`)."""
        targets = self._hist_store().targets_for(self.state, self._tracked, params)
        self._fh_prepared = (params, targets)
        for _, target in targets.values():
            if target.step.device.type == "cuda":  # CUDA graphs (reduce-overhead) write them in place
                for t in (target.step, target.total, target.rows):
                    torch._dynamo.mark_static_address(t)
        if any(p.device.type == "cpu" for p in params):
            from . import csrc  # its first call builds or loads the library, outside any trace

            if csrc.enabled():
                csrc.available()

    @_torch_grad_mode
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step, recording the histograms.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        if self._checks_graph_capture:
            # newer torch checks any accelerator; older versions have only the CUDA check
            check = getattr(self, "_accelerator_graph_capture_health_check", None)
            (check or self._cuda_graph_capture_health_check)()  # type: ignore[attr-defined]

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        record = None if torch.compiler.is_compiling() else self.__dict__.setdefault("_fh_backends", {})
        for i, group in enumerate(self.param_groups):
            lists, kwargs = self._gather(group)
            params = lists[0]
            if not params:
                continue
            targets = self._step_targets(params) if group["track"] else None
            dispatch.run(self.declaration, lists, targets, kwargs, record=record, group=i)

        return loss

    def backends(self) -> dict[tuple[int, torch.device, torch.dtype], Choice]:
        """What ran the latest eager step of each (param group index, device, parameter
        dtype): a :class:`~fasthist.dispatch.Choice`, the backend's name
        (:mod:`fasthist.backend`) and why each faster backend turned the call down. Steps
        compiled with ``torch.compile`` are not recorded."""
        return dict(self.__dict__.get("_fh_backends", {}))

    def _step_targets(self, params: list[Tensor]) -> Any:
        """The targets of this step's ``params``: those :meth:`_prepare_tracking` just found
        for the same list in eager mode (the store's validity check walks every parameter, so
        it runs once per step, not twice), else the store's."""
        prepared, self._fh_prepared = self.__dict__.get("_fh_prepared"), None
        if prepared is not None and prepared[0] is params and not torch.compiler.is_compiling():
            return prepared[1]
        return self._hist_store().targets_for(self.state, self._tracked, params)

    # -- construction helpers ------------------------------------------------------------
    @staticmethod
    def _check_bins(bins: LogBins | None) -> LogBins:
        if bins is None:
            return LogBins()
        if not isinstance(bins, LogBins):
            raise TypeError(f"bins must be a fasthist.LogBins, but got {type(bins).__name__}")
        return bins

    def _check_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch rejects sets itself, with its message
            params = param_group["params"] = list(params)  # a generator can be read once
        for i, p in enumerate(params):
            t = p[1] if isinstance(p, tuple) else p
            if isinstance(t, Tensor) and not (t.is_floating_point() or t.is_complex()):
                raise TypeError(
                    f"{type(self).__name__} can only optimize floating point or complex parameters, "
                    f"but parameter {i} of the group has dtype {t.dtype}"
                )
        track = param_group.get("track", True)
        if not isinstance(track, bool):
            raise ValueError(f"Invalid track value: {track}; expected a bool")
        check_distinct_tensors(params, len(self.param_groups))
        if params and all(isinstance(p, tuple) for p in params):
            groups = self.param_groups
            names = [*(g.get("param_names") for g in groups), [p[0] for p in params]]
            check_unique_names(names, [len(g["params"]) for g in groups] + [len(params)])

    def _init_tracking(self, track: bool, bins: LogBins | None) -> None:
        """Validate ``track``/``bins``; call before ``torch.optim.Optimizer.__init__``."""
        self._bins = self._check_bins(bins)
        if not isinstance(track, bool):
            raise ValueError(f"Invalid track value: {track}; expected a bool")
        self._track_default = track

    def _finish_tracking(self) -> None:
        """Record the tracking options in ``defaults`` and every group; call after it."""
        self.defaults["track"] = self._track_default  # type: ignore[attr-defined]
        self._set_hist_defaults()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_param_group(param_group)
        super().add_param_group(param_group)  # type: ignore[misc]
        param_group.setdefault("track", getattr(self, "_track_default", True))
        param_group["hist_bins"] = self._bins.spec

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        if "_bins" not in self.__dict__:  # unpickled from an object without one
            self._bins = LogBins()
        self._set_hist_defaults()
        self.__dict__.pop("_fh_store", None)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state["_bins"] = self._bins
        return state

    # -- storage -------------------------------------------------------------------------
    def _hist_store(self) -> HistogramStore:
        store = self.__dict__.get("_fh_store")
        if store is None:
            store = self.__dict__["_fh_store"] = HistogramStore(self._bins)
        return store

    def _tracked(self) -> list[tuple[str, Tensor]]:
        return tracked(self.param_groups, self.state)

    def histogram_rows(
        self, window: str = "step", *, process_group: Any = None, sharded: bool | None = None
    ) -> HistogramRows:
        """All histograms of ``window`` ("step" or "total") as one ``[R, num_bins]`` int64
        matrix with the tensors' names, without copying them off the device; with
        ``process_group``, merged across its ranks (see :meth:`histograms`)."""
        names, params, counts = self._hist_store().rows(self.state, self._tracked(), window)
        if process_group is None:
            return HistogramRows(list(names), list(params), counts)
        from .distributed import global_rows  # torch.distributed only when asked for

        merged_names, merged = global_rows(names, params, counts, self._bins, process_group, sharded)
        if not merged_names:
            return HistogramRows([], [], None)
        local = dict(zip(names, params, strict=True))
        return HistogramRows(merged_names, [local.get(n) for n in merged_names], merged)

    def _checked_rows(
        self, window: str, process_group: Any, sharded: bool | None
    ) -> tuple[list[str], list[Tensor | None], Tensor | None]:
        """:meth:`histogram_rows`, refusing rows whose counts wrapped past int64."""
        names, params, counts = self.histogram_rows(window, process_group=process_group, sharded=sharded)
        if counts is not None:
            bad = invalid_rows(counts)
            if bool(bad.any()):
                which = [n for n, b in zip(names, bad.tolist(), strict=True) if b]
                raise RuntimeError(
                    f"histogram counts of {', '.join(map(repr, which[:5]))}{'...' if len(which) > 5 else ''} "
                    f"({window!r} window) overflowed int64; call reset_histograms()"
                )
        return names, params, counts

    # -- public queries ------------------------------------------------------------------
    @property
    def bins(self) -> LogBins:
        """The :class:`LogBins` every histogram of this optimizer uses."""
        return self._bins

    def histograms(
        self, *, window: str = "step", process_group: Any = None, sharded: bool | None = None
    ) -> dict[str, Histogram]:
        """Histogram of every tracked tensor, by name (``"{group}.{index}"`` when unnamed).

        ``window="step"``: values of each tensor's latest update; ``"total"``: summed over
        all steps since construction or :meth:`reset_histograms`. Copies, not views.

        ``process_group`` (every query accepts it): merge over the ranks of that group
        (``torch.distributed.group.WORLD`` for all) into global histograms, the same on
        every rank; a collective, so call it on every rank. Replicated tensors (DDP) count
        once, shards (DTensor/FSDP2) add up to the whole tensor; ``sharded`` overrides the
        per-tensor default. See :mod:`fasthist.distributed`. None (default): this rank only.
        """
        names, _, counts = self._checked_rows(window, process_group, sharded)
        if counts is None:
            return {}
        rows = counts.clone().unbind(0)
        return {n: Histogram(c, self._bins, validate=False) for n, c in zip(names, rows, strict=True)}

    def histogram(
        self,
        param: Tensor | str | None = None,
        *,
        window: str = "step",
        process_group: Any = None,
        sharded: bool | None = None,
    ) -> Histogram:
        """Histogram of one tracked tensor (by tensor or name), or of all merged (None)."""
        names, order, counts = self._checked_rows(window, process_group, sharded)
        if param is None:
            if counts is None:
                return Histogram.empty(self._bins)
            merged = counts.sum(dim=0)
            if bool(invalid_rows(merged.unsqueeze(0))[0]):
                raise RuntimeError(f"the {window!r} histograms of all tracked tensors together overflow int64")
            return Histogram(merged, self._bins, validate=False)
        if isinstance(param, str):
            if param not in names:
                raise KeyError(
                    f"no tracked parameter named {param!r}; {why_untracked(self.param_groups, param, names)}"
                )
            r = names.index(param)
        elif isinstance(param, Tensor):
            matches = [i for i, p in enumerate(order) if p is param]
            if not matches:
                raise KeyError(f"parameter is not tracked: {why_untracked(self.param_groups, param, names)}")
            r = matches[0]
        else:
            raise TypeError(f"param must be a Tensor, a str or None, but got {type(param).__name__}")
        assert counts is not None
        return Histogram(counts[r].clone(), self._bins, validate=False)

    def quantiles(
        self,
        qs: float | list[float] | Tensor,
        *,
        window: str = "step",
        exclude_zeros: bool = False,
        process_group: Any = None,
        sharded: bool | None = None,
    ) -> tuple[list[str], Tensor]:
        """Quantiles of every tracked tensor at once: ``(names, float64 [num_tensors, len(qs)])``
        on the histograms' device, computed in one batched operation (rule and guarantee
        of :class:`Histogram`)."""
        qt, _ = as_quantiles(qs)
        names, _, counts = self._checked_rows(window, process_group, sharded)
        if counts is None:
            return [], torch.empty(0, qt.numel(), dtype=torch.float64)
        return names, batched_quantile(counts, qt, self._bins, exclude_zeros=exclude_zeros)

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
        """Zero both windows of every tensor, in every group (tracked now or not)."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                for key in HIST_KEYS:
                    if key in st:  # rows of the packed buffers, or loaded tensors
                        st[key].zero_()

    # -- state dict ----------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every tensor in a parameter's state to the parameter's floating dtype;
        # lift the histogram counts out first and put them back as int64 afterwards.
        state_dict = dict(state_dict)
        saved_state = state_dict["state"]
        state_dict["state"], hists = split_saved_counts(saved_state)
        spec = None
        for g in state_dict.get("param_groups", []):
            spec = g.get("hist_bins", spec)
        if hists and spec is not None and tuple(spec) != self._bins.spec:
            raise ValueError(
                f"loaded state dict has histograms recorded with LogBins{tuple(spec)}, "
                f"but this optimizer uses {self._bins}"
            )
        hists = loadable_counts(hists, self._bins.num_bins)  # raises before anything changes
        saved_groups = state_dict.get("param_groups", [])
        pairs = list(zip(self.param_groups, saved_groups, strict=False))
        check_unique_names(
            [s.get("param_names", g.get("param_names")) for g, s in pairs], [len(g["params"]) for g, _ in pairs]
        )
        track = [g.get("track") for g in self.param_groups]
        super().load_state_dict(state_dict)  # type: ignore[misc]
        for group, saved, was in zip(self.param_groups, state_dict["param_groups"], track, strict=False):
            if "track" not in saved and was is not None:  # e.g. torch.optim's state dict: keep ours
                group["track"] = was
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        for k, saved in saved_state.items():
            p = id_map.get(k)
            if p is None:
                continue
            for key, counts in hists.get(k, {}).items():
                self.state[p][key] = counts.to(device=p.device, copy=True)
            self._load_param_state(p, saved)
        self.__dict__.pop("_fh_store", None)

    def _load_param_state(self, p: Tensor, saved: dict[str, Any]) -> None:
        """Hook: fix up ``p``'s state after torch's ``load_state_dict`` from its ``saved``
        state (e.g. undo torch's cast to the parameter's dtype). Default: nothing."""

    def _set_hist_defaults(self) -> None:
        for group in self.param_groups:
            group.setdefault("track", self.defaults.get("track", True))  # type: ignore[attr-defined]
            group["hist_bins"] = self._bins.spec
