"""The compiled CPU passes of fasthist: the histogram pass (``histogram.cpp``,
:func:`accumulate_`), which the reference's :func:`fasthist.reference.histogram.accumulate_`
runs on CPU tensors when it is available, and the fused tracked steps (``fused_adam.cpp``,
``fused_adagrad.cpp``): what ``fused=True`` runs on CPU tensors (:func:`fused_step_`,
decided by :func:`fused_supports`).

Modules: :mod:`.library` finds, checks, builds and loads the library; :mod:`.build` says how
it is built and stamped; :mod:`.histogram` and :mod:`.fused` call its ops. The C++ sources:
``log_bins.h`` (the LogBins key of a float32), ``dtype_io.h`` (loads and stores of the
parameter dtypes), ``private_hist.h`` (per-thread histograms), ``windows.h`` (the two
windows and their spans), ``sweep.h`` (the one parallel sweep), ``op_args.h``/``.cpp``
(what every op checks and reads), and one ``.cpp`` per op.
"""

from .fused import fused_step_, fused_supports
from .histogram import accumulate_
from .library import available, enabled, library_path

__all__ = ["accumulate_", "available", "enabled", "fused_step_", "fused_supports", "library_path"]
