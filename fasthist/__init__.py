"""fasthist: Adam/AdamW for PyTorch that histogram sqrt(v_hat) at every step, for free.

``fasthist.Adam``/``AdamW`` are drop-in replacements for ``torch.optim.Adam``/``AdamW``;
``LogBins`` is the binning, ``Histogram`` the mergeable quantile sketch, and
``opt.eps_range()`` the ε-range rule of Silva & Rodriguez (2024).

The names below are imported on first use (PEP 562), so that ``import fasthist`` (and the
``fasthist`` command's entry point, which lives in this package) does not spend a second
importing torch before the command can handle Ctrl-C.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adabelief import AdaBelief
    from .adagrad import Adagrad
    from .adam import Adam, AdamW
    from .bins import LogBins
    from .eps import EpsRange, EpsRow
    from .estimate import estimate_eps_range
    from .histogram import Histogram
    from .recorder import QuantileRecorder, QuantileTrace
    from .rmsprop import RMSprop
    from .wrapped import unwrap

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "AdaBelief": "adabelief",
    "Adagrad": "adagrad",
    "Adam": "adam",
    "AdamW": "adam",
    "LogBins": "bins",
    "EpsRange": "eps",
    "EpsRow": "eps",
    "estimate_eps_range": "estimate",
    "Histogram": "histogram",
    "QuantileRecorder": "recorder",
    "QuantileTrace": "recorder",
    "RMSprop": "rmsprop",
    "unwrap": "wrapped",
}

__all__ = ["Adam", "AdamW", "RMSprop", "Adagrad", "AdaBelief", "LogBins", "Histogram", "EpsRange", "EpsRow"]
__all__ += ["estimate_eps_range", "QuantileRecorder", "QuantileTrace", "unwrap"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # ``fasthist.estimate`` and the like worked without an import when this file imported
        # them eagerly: a submodule still does.
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'fasthist' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
