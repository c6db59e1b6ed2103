"""Names of the tensors an optimizer tracks: the parameter names given to it (torch's
``param_names``), else ``"{group}.{index}"``. A name identifies one tensor and a tensor has
one name: that is what matches histograms across queries, checkpoints and ranks."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["check_distinct_tensors", "check_unique_names", "declared", "tracked", "why_untracked"]


def _names(gi: int, group: dict[str, Any]) -> list[str]:
    names = group.get("param_names")
    return list(names) if names is not None else [f"{gi}.{pi}" for pi in range(len(group["params"]))]


def tracked(param_groups: list[dict[str, Any]], state: Any) -> list[tuple[str, Tensor]]:
    """``(name, param)`` of every parameter with state in a group with ``track=True``."""
    out = []
    for gi, group in enumerate(param_groups):
        if group.get("track", True):
            out += [(n, p) for n, p in zip(_names(gi, group), group["params"], strict=True) if len(state.get(p, {}))]
    return out


def declared(param_groups: list[dict[str, Any]]) -> list[str]:
    """The name of every parameter in a group with ``track=True``, stepped yet or not."""
    return [n for gi, group in enumerate(param_groups) if group.get("track", True) for n in _names(gi, group)]


def check_distinct_tensors(params: list[Any], gi: int) -> None:
    """Refuse a tensor given twice in param group ``gi`` (``params``: tensors or
    ``(name, tensor)`` pairs). torch.optim only warns, and steps it twice."""
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        j = seen.setdefault(id(p[1] if isinstance(p, tuple) else p), i)
        if j != i:
            raise ValueError(
                f"param group {gi} holds the same tensor twice (parameters {j} and {i}); "
                "a tensor has one state and one histogram"
            )


def check_unique_names(names: list[list[str] | None], sizes: list[int]) -> None:
    """Refuse a name given to two tensors: ``names[g]`` are group ``g``'s parameter names
    (None: the group is unnamed, its ``sizes[g]`` tensors are named ``"{group}.{index}"``)."""
    owner: dict[str, tuple[int, int]] = {}
    for gi, group_names in enumerate(names):
        if group_names is None:
            group_names = [f"{gi}.{pi}" for pi in range(sizes[gi])]
        for pi, name in enumerate(group_names):
            gj, pj = owner.setdefault(name, (gi, pi))
            if (gj, pj) == (gi, pi):
                continue
            if gj == gi:
                detail = f"parameters {pj} and {pi}"
            else:
                detail = f"parameter {pi}; param group {gj} already names its parameter {pj} so"
            raise ValueError(
                f"duplicate parameter name {name!r} in param group {gi} ({detail}); a name must identify one tensor"
            )


def why_untracked(param_groups: list[dict[str, Any]], param: Tensor | str, tracked_names: list[str]) -> str:
    """What is the case for a parameter (tensor or name) that has no histogram."""
    for gi, group in enumerate(param_groups):
        for name, p in zip(_names(gi, group), group["params"], strict=True):
            if p is param or name == param:
                if not group.get("track", True):
                    return f"it is in param group {gi}, which has track=False"
                return "it has no state yet (no step taken, or it never had a gradient)"
    what = "it is not a parameter of this optimizer" if isinstance(param, Tensor) else "no parameter has that name"
    return f"{what}; tracked: {tracked_names[:5]}{'...' if len(tracked_names) > 5 else ''}"
