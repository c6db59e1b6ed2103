"""fasthist: Adam/AdamW for PyTorch that histogram sqrt(v_hat) at every step, for free.

``fasthist.Adam``/``AdamW`` are drop-in replacements for ``torch.optim.Adam``/``AdamW``;
``LogBins`` is the binning, ``Histogram`` the mergeable quantile sketch, and
``opt.eps_range()`` the ε-range rule of Silva & Rodriguez (2024).
"""

from .adabelief import AdaBelief
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .bins import LogBins
from .eps import EpsRange, EpsRow
from .estimate import estimate_eps_range
from .histogram import Histogram
from .recorder import QuantileRecorder, QuantileTrace
from .rmsprop import RMSprop

__all__ = ["Adam", "AdamW", "RMSprop", "Adagrad", "AdaBelief", "LogBins", "Histogram", "EpsRange", "EpsRow"]
__all__ += ["estimate_eps_range", "QuantileRecorder", "QuantileTrace"]
__version__ = "0.1.0"
