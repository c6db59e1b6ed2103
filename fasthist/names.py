"""Names of the tensors an optimizer tracks: the parameter names given to it (torch's
``param_names``), else ``"{group}.{index}"`` (``model.parameters()`` gives ``"0.0"``,
``"0.1"``, ...: the position, which says nothing about the tensor; name them with
``model.named_parameters()``). A name identifies one tensor and a tensor has one histogram:
that is what matches histograms across queries, checkpoints and ranks. A tensor given twice
in one group (torch warns, and steps it twice) keeps the name of its first place."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .declaration import quantities

__all__ = ["check_unique_names", "declared", "tracked", "why_untracked"]


def _names(gi: int, group: dict[str, Any]) -> list[str]:
    names = group.get("param_names")
    return list(names) if names is not None else [f"{gi}.{pi}" for pi in range(len(group["params"]))]


def tracked(param_groups: list[dict[str, Any]], state: Any, quantity: str = "sqrt_v") -> list[tuple[str, Tensor]]:
    """``(name, param)`` of every parameter with state in a group whose ``track`` records
    ``quantity`` (``"sqrt_v"``: every tracked group), each tensor once (under the name of
    its first place)."""
    out = []
    seen: set[int] = set()
    for gi, group in enumerate(param_groups):
        if quantity not in quantities(group.get("track", True)):
            continue
        for n, p in zip(_names(gi, group), group["params"], strict=True):
            if id(p) not in seen and len(state.get(p, {})):
                seen.add(id(p))
                out.append((n, p))
    return out


def declared(param_groups: list[dict[str, Any]]) -> list[str]:
    """The name of every parameter in a group with ``track=True``, stepped yet or not."""
    return [n for gi, group in enumerate(param_groups) if group.get("track", True) for n in _names(gi, group)]


def check_unique_names(names: list[list[str] | None], sizes: list[int], params: list[list[Any]] | None = None) -> None:
    """Refuse a name given to two tensors: ``names[g]`` are group ``g``'s parameter names
    (None: the group is unnamed, its ``sizes[g]`` tensors are named ``"{group}.{index}"``).
    With ``params`` (group ``g``'s tensors), a name repeated with the same tensor is that
    tensor given twice, which torch allows (with a warning)."""
    owner: dict[str, tuple[int, int]] = {}
    for gi, group_names in enumerate(names):
        if group_names is None:
            group_names = [f"{gi}.{pi}" for pi in range(sizes[gi])]
        for pi, name in enumerate(group_names):
            gj, pj = owner.setdefault(name, (gi, pi))
            if (gj, pj) == (gi, pi) or (params is not None and params[gj][pj] is params[gi][pi]):
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
                first = next(n for n, q in zip(_names(gi, group), group["params"], strict=True) if q is p)
                if first != name and first in tracked_names:
                    return f"the tensor is given twice in param group {gi}; its histogram is named {first!r}"
                return "it has no state yet (no step taken, or it never had a gradient)"
    what = "it is not a parameter of this optimizer" if isinstance(param, Tensor) else "no parameter has that name"
    return f"{what}; tracked: {tracked_names[:5]}{'...' if len(tracked_names) > 5 else ''}"
