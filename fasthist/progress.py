"""The progress bar of the ``fasthist`` command and of :func:`fasthist.estimate_eps_range`."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int | None, desc: str, *, enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar on stderr (``update(n)``, ``set_postfix_str(s)``, ``close()``), or None
    when not ``enabled`` or when tqdm is not installed (it comes with the [demo] extra):
    callers skip the bar's calls on None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)
