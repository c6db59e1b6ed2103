"""Pure-PyTorch reference backend: the CPU path and the oracle of the kernel tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..declaration import HistInputs
from ..target import HistTarget
from .histogram import record_

__all__ = ["reference_step"]


def reference_step(
    update: Callable[..., None],
    hist_inputs: Callable[[list[list[Tensor]], dict[str, Any]], HistInputs],
    *,
    sqrt: bool = True,
    reciprocal: bool = False,
) -> Callable[..., None]:
    """An optimizer's reference step, ``step(*lists, hist=None, **kwargs)``: ``update(*lists,
    **kwargs)`` (its pure torch update: the functional form's lists and keyword arguments),
    then the histogram pass in torch ops into ``hist`` (:func:`.histogram.record_`, which
    states the rounding; nothing when ``hist`` is None)."""

    def step(*lists: list[Tensor], hist: HistTarget | None = None, **kwargs: Any) -> None:
        update(*lists, **kwargs)
        record_(hist, hist_inputs, list(lists), kwargs, sqrt=sqrt, reciprocal=reciprocal)

    return step
