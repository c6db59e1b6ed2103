"""What a torch optimizer needs to histogram as it steps: the step, the group options
(``track``, the bins), and the state-dict hooks that keep the counts through torch's
``load_state_dict``. The storage, the queries, the merge across ranks and the ε rule are
beside it, in :class:`fasthist.queries.HistogramQueries`.

The mixin owns ``step`` (closure, ``_init_group``, histogram targets, the call into
:mod:`fasthist.dispatch`); each optimizer supplies its :class:`~fasthist.declaration.OptimizerDecl`
and :meth:`HistogramMixin._gather`, the lists and keyword arguments of its functional form.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _use_grad_for_differentiable

from . import compiled, dispatch
from .bins import LogBins
from .declaration import QUANTITIES, OptimizerDecl, quantities
from .dispatch import Call, Choice
from .names import check_unique_names
from .queries import HistogramQueries, HistogramRows
from .store import ROW_KEYS, HistogramStore, loadable_counts, saved_rows, split_saved_counts

__all__ = ["HistogramMixin", "HistogramRows", "TRACKING_ARGS_DOC", "drop_in_doc"]

TRACKING_ARGS_DOC = """\
        track (bool or tuple of str): record histograms (default: True, which records
            ``"sqrt_v"`` alone); a tuple of names from ``("sqrt_v", "staleness")`` (with
            ``"sqrt_v"``) records the staleness ``|g| / max(sqrt(v_hat), eps)`` too, where the
            optimizer has one (:mod:`fasthist.health`). A group option too: a param group with
            ``track=False`` records nothing and costs nothing.
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


def _check_track(track: Any, decl: OptimizerDecl) -> bool | tuple[str, ...]:
    """``track`` (an optimizer argument or a group option), normalised: a bool as it is,
    names of :data:`~fasthist.declaration.QUANTITIES` as a tuple in that order; refused
    unless one of those, with ``"sqrt_v"`` among the names and each name one ``decl`` tracks."""
    if isinstance(track, bool):
        return track
    if not isinstance(track, (tuple, list)) or not all(isinstance(q, str) for q in track):
        raise ValueError(f"Invalid track value: {track!r}; expected a bool or a tuple of names from {QUANTITIES}")
    unknown = [q for q in track if q not in QUANTITIES]
    if unknown:
        raise ValueError(
            f"Invalid track value: {track!r}; unknown quantity {unknown[0]!r}, expected names from {QUANTITIES}"
        )
    if "sqrt_v" not in track:
        raise ValueError(f"Invalid track value: {track!r}; 'sqrt_v' must be tracked with any other quantity")
    if "staleness" in track and "staleness" not in decl.trackable:
        raise ValueError(f"Invalid track value: {track!r}; {decl.name} has no staleness: {decl.no_staleness}")
    return tuple(q for q in QUANTITIES if q in track)


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


class HistogramMixin(HistogramQueries):
    """Mixed into a ``torch.optim`` optimizer subclass, before it in the bases. Requires
    ``self._bins`` and the group option ``track``; the subclass supplies :meth:`_gather`,
    ``declaration`` (its :class:`~fasthist.declaration.OptimizerDecl`) and ``_checks_graph_capture``."""

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
        self._note_empty_entries(group)
        ret = super()._init_group(group, params, *lists)  # type: ignore[misc]
        if group["track"] and params:
            self._prepare_tracking(params, "staleness" in quantities(group["track"]))
        return ret

    def _note_empty_entries(self, group: dict[str, Any]) -> None:
        """Note the parameters of ``group`` with a gradient whose state entry exists and is
        empty (read through ``optimizer.state``'s defaultdict before their first step): the
        lazy initialisation about to run fills them in place, and a step whose plan fails
        empties them again (:meth:`_plan`). Usually no entry is empty: one pass in C over the
        entries says so (45 µs for 1,000 entries, measured), and only then are the parameters
        looked up."""
        state = self.state
        noted = self.__dict__.get("_fh_empty_entries")
        if noted is None or not any(map(operator.not_, state.values())):
            return
        noted.extend(p for p in group["params"] if p.grad is not None and not state.get(p, True))

    def _prepare_tracking(self, params: list[Tensor], staleness: bool = False) -> None:
        """Build (or find) the packed rows and targets of ``params`` and load the compiled
        CPU histogram where one of them is on the CPU. Idempotent, cheap when nothing changed.
        The targets are kept for the step that called ``_init_group`` (:meth:`_step_targets`);
        ``staleness``: they carry the staleness windows too."""
        targets = self._hist_store().targets_for(self.state, self._tracked, params, staleness)
        self._fh_prepared = (params, staleness, targets)
        for _, target in targets.values():
            if target.step.device.type == "cuda":  # CUDA graphs (reduce-overhead) write them in place
                for t in (target.step, target.total, target.rows, *(target.staleness or ())):
                    torch._dynamo.mark_static_address(t)
        if any(p.device.type == "cpu" for p in params):
            from . import csrc  # its first call builds or loads the library, outside any trace

            if csrc.enabled():
                csrc.available()

    @_torch_grad_mode
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step, recording the histograms.

        In two phases, so that a step that refuses its input changes nothing. First every
        group is planned (:meth:`_plan`): torch's ``_init_group`` (lazy state and its
        checks, e.g. sparse gradients), the histogram targets, and per device the backend
        chosen and its inputs checked (:func:`fasthist.dispatch.plan`); nothing is written,
        and if anything raises (an exception, ``KeyboardInterrupt``) the state entries this
        step created are dropped (and those it filled, empty before, emptied): parameters,
        state and histograms are as before the call. The
        plan checks every state tensor against its parameter (dtype, device, shape:
        :func:`fasthist.backend.check_states`, :func:`fasthist.dispatch.check_ahead`), which
        torch's functional forms find only after stepping the tensors before it. Then every
        call runs. A failure while they run (a kernel fault, out of memory) cannot be undone
        without copying every tensor at every step: the calls before it stay applied (each
        tensor's parameter, state, step count and histograms together), the calls after it are
        not run, and the failing one leaves what its backend wrote.

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
        for i, calls, kwargs in self._plan():
            dispatch.execute(self.declaration, calls, kwargs, record=record, group=i)
        return loss

    def _plan(self) -> list[tuple[int, list[Call], dict[str, Any]]]:
        """The first phase of :meth:`step`: ``(group index, its calls, its keyword arguments)``
        for every group with a parameter to step, writing nothing; on any exception, the
        state entries it created are dropped before it propagates (eager steps: a compiled
        step runs ``_init_group`` while dynamo traces it)."""
        if torch.compiler.is_compiling():
            return self._plan_groups()
        created = len(self.state)
        emptied = self.__dict__["_fh_empty_entries"] = []
        try:
            return self._plan_groups()
        except BaseException:
            self._fh_prepared = None
            for p in emptied:  # entries that were there, empty, and were filled: empty again
                self.state[p].clear()
            if len(self.state) > created:  # torch's lazy initialisation appends new entries
                for p in list(self.state)[created:]:
                    del self.state[p]
            if emptied or len(self.state) > created:
                self._hist_store().invalidate()  # repacked without them on next use
            raise
        finally:
            del self.__dict__["_fh_empty_entries"]

    def _plan_groups(self) -> list[tuple[int, list[Call], dict[str, Any]]]:
        gathered = []
        for i, group in enumerate(self.param_groups):  # every group's state before any target
            lists, kwargs = self._gather(group)
            prepared, self._fh_prepared = self.__dict__.get("_fh_prepared"), None
            gathered.append((i, lists, kwargs, prepared))
        plans = []
        for i, lists, kwargs, prepared in gathered:
            if lists[0]:
                track = self.param_groups[i]["track"]
                targets = self._step_targets(lists[0], prepared, "staleness" in quantities(track)) if track else None
                plans.append((i, dispatch.plan(self.declaration, lists, targets, kwargs), kwargs))
        dispatch.check_ahead(self.declaration, [call for _, calls, _ in plans for call in calls])
        return plans

    def backends(self) -> dict[tuple[int, torch.device, torch.dtype], Choice]:
        """What ran the latest eager step of each (param group index, device, parameter
        dtype): a :class:`~fasthist.dispatch.Choice`, the backend's name
        (:mod:`fasthist.backend`) and why each faster backend turned the call down. Steps
        compiled with ``torch.compile`` are not recorded."""
        return dict(self.__dict__.get("_fh_backends", {}))

    def _step_targets(self, params: list[Tensor], prepared: Any, staleness: bool) -> Any:
        """The targets of this step's ``params``: ``prepared``, what :meth:`_prepare_tracking`
        found for the same list in eager mode (the store's validity check walks every
        parameter, so it runs once per step, not twice), while the store still holds their
        buffers (a later group's first step rebuilds them); else the store's. ``staleness``:
        they carry the staleness windows too."""
        store = self._hist_store()
        if prepared is not None and prepared[0] is params and prepared[1] == staleness:
            targets = prepared[2]
            if not torch.compiler.is_compiling() and all(
                store.scratch.get(dev, (None,))[0] is t.step for dev, (_, t) in targets.items()
            ):
                return targets
        return store.targets_for(self.state, self._tracked, params, staleness)

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
        _check_track(param_group.get("track", True), self.declaration)
        if params and all(isinstance(p, tuple) for p in params):
            groups = self.param_groups
            names = [*(g.get("param_names") for g in groups), [p[0] for p in params]]
            tensors = [*(g["params"] for g in groups), [p[1] for p in params]]
            check_unique_names(names, [len(g["params"]) for g in groups] + [len(params)], tensors)

    def _init_tracking(self, track: bool | tuple[str, ...], bins: LogBins | None) -> None:
        """Validate ``track``/``bins``; call before ``torch.optim.Optimizer.__init__``."""
        self._bins = self._check_bins(bins)
        self._track_default = _check_track(track, self.declaration)

    def _finish_tracking(self) -> None:
        """Record the tracking options in ``defaults`` and every group; call after it."""
        self.defaults["track"] = self._track_default  # type: ignore[attr-defined]
        self._set_hist_defaults()
        self._register_state_dict_hooks()
        compiled.op(self.declaration)  # defined here, never while dynamo traces a step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_param_group(param_group)
        super().add_param_group(param_group)  # type: ignore[misc]
        track = param_group.setdefault("track", getattr(self, "_track_default", True))
        param_group["track"] = _check_track(track, self.declaration)  # normalised: a bool or a tuple
        param_group["hist_bins"] = self._bins.spec

    def __setstate__(self, state: dict[str, Any]) -> None:
        counts = state.pop("_fh_counts", None) or {}
        super().__setstate__(state)  # type: ignore[misc]
        if "_bins" not in self.__dict__:  # unpickled from an object without one
            self._bins = LogBins()
        for p, st in self.state.items():  # pickled by a version that kept the rows in the state
            if isinstance(st, dict) and any(key in st for key in ROW_KEYS):
                counts.setdefault(p, {}).update((key, st.pop(key)) for key in ROW_KEYS if key in st)
        self._set_hist_defaults()
        self.__dict__["_fh_store"] = HistogramStore(self._bins, counts)
        self._register_state_dict_hooks()  # torch's pickling keeps no hooks
        compiled.op(self.declaration)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state["_bins"] = self._bins
        state["_fh_counts"] = self._hist_store().kept(self.state)  # one tensor per row
        return state

    # -- state dict ----------------------------------------------------------------------
    # Registered on torch's hooks (``load_state_dict`` and ``state_dict`` stay torch's). The
    # rows are not in ``self.state`` (:mod:`fasthist.store`): ``state_dict`` adds them to each
    # parameter's saved entry, and ``load_state_dict`` lifts them out before torch's load (which
    # would cast them to the parameter's floating dtype) and into the store after it.
    def _register_state_dict_hooks(self) -> None:
        """Register the state-dict hooks below once (construction, unpickling)."""
        opt: Any = self
        if HistogramMixin._lift_saved_counts not in opt._optimizer_load_state_dict_pre_hooks.values():
            opt.register_load_state_dict_pre_hook(HistogramMixin._lift_saved_counts)
            opt.register_load_state_dict_post_hook(HistogramMixin._restore_saved_counts)
            opt.register_state_dict_post_hook(HistogramMixin._save_rows)

    def _lift_saved_counts(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Load pre-hook: ``state_dict`` without its histogram rows, which are checked here
        (bins, names, counts: raises before anything changes) and kept for the post-hook."""
        state_dict = dict(state_dict)
        saved_state = state_dict["state"]
        state_dict["state"], hists = split_saved_counts(saved_state)
        saved_groups = state_dict.get("param_groups", [])
        spec = next((tuple(g["hist_bins"]) for g in reversed(saved_groups) if "hist_bins" in g), None)
        if hists and spec is not None and spec != self._bins.spec:
            raise ValueError(
                f"loaded state dict has histograms recorded with LogBins{spec}, but this optimizer uses {self._bins}"
            )
        hists = loadable_counts(hists, self._bins.num_bins)
        pairs = list(zip(self.param_groups, saved_groups, strict=False))
        check_unique_names(
            [s.get("param_names", g.get("param_names")) for g, s in pairs],
            [len(g["params"]) for g, _ in pairs],
            [g["params"] for g, _ in pairs],
        )
        track = [g.get("track") for g in self.param_groups]
        self.__dict__["_fh_loading"] = (hists, saved_state, saved_groups, track)
        return state_dict

    def _restore_saved_counts(self) -> None:
        """Load post-hook: the lifted rows into the store (replacing every row it held), as
        int64 on each parameter's device; the groups' ``track`` kept where the loaded groups
        have none (e.g. torch.optim's)."""
        hists, saved_state, saved_groups, track = self.__dict__.pop("_fh_loading")
        for group, saved, was in zip(self.param_groups, saved_groups, track, strict=False):
            if "track" not in saved and was is not None:
                group["track"] = was
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        loaded = {}
        for k, saved in saved_state.items():
            p = id_map.get(k)
            if p is None:
                continue
            rows = hists.get(k)
            if rows and p in self.state:
                loaded[p] = {key: counts.to(device=p.device, copy=True) for key, counts in rows.items()}
            self._load_param_state(p, saved)
        self._hist_store().load(loaded)

    def _save_rows(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """State-dict post-hook: each parameter's histogram rows in its saved state entry
        (a new dict: torch's entries are the live ``self.state[p]``), each row in its own
        storage as bytes (:func:`~fasthist.store.saved_rows`)."""
        state = state_dict["state"]
        counts = self._hist_store().counts
        if not counts:
            return state_dict
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=True):
            for p, k in zip(group["params"], saved["params"], strict=True):
                rows = counts.get(p)
                st = state.get(k)
                if rows and isinstance(st, dict) and not any(key in st for key in rows):
                    state[k] = {**st, **saved_rows(rows)}
        return state_dict

    def _load_param_state(self, p: Tensor, saved: dict[str, Any]) -> None:
        """Hook: fix up ``p``'s state after torch's ``load_state_dict`` from its ``saved``
        state (e.g. undo torch's cast to the parameter's dtype). Default: nothing."""

    def _set_hist_defaults(self) -> None:
        for group in self.param_groups:
            group.setdefault("track", self.defaults.get("track", True))  # type: ignore[attr-defined]
            group["hist_bins"] = self._bins.spec
