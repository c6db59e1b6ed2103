"""DTensor (FSDP2, tensor parallel) recognised in one place, by its type's name, so that
nothing imports ``torch.distributed`` unless a DTensor is actually there."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["is_dtensor", "local_tensor"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return type(t).__name__ == "DTensor"


def local_tensor(t: Tensor) -> Tensor:
    """A DTensor's local shard (sharing its storage), any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t
