"""The compiled CPU passes of fasthist: the histogram pass (``histogram.cpp``,
:func:`histogram_`), the bins of :func:`fasthist.reference.histogram.accumulate_` in one
parallel sweep, and the fused tracked steps (``fused_adam.cpp``, ``fused_adagrad.cpp``):
what ``fused=True`` runs on CPU tensors (:func:`fused_step_`). Both are backends of
:mod:`fasthist.backend`; :mod:`fasthist.dispatch` decides when each runs.

Modules: :mod:`.library` finds, checks, builds and loads the library; :mod:`.build` says how
it is built and stamped; :mod:`.histogram` and :mod:`.fused` call its ops. The C++ sources:
``log_bins.h`` (the LogBins key of a float32), ``dtype_io.h`` (loads and stores of the
parameter dtypes), ``private_hist.h`` (per-thread histograms), ``windows.h`` (the two
windows and their spans), ``sweep.h`` (the one parallel sweep), ``op_args.h``/``.cpp``
(what every op checks and reads), and one ``.cpp`` per op.
"""

from .fused import fused_step_
from .histogram import histogram_
from .library import available, enabled, library_path

__all__ = ["TRACKS_STALENESS", "available", "enabled", "fused_step_", "histogram_", "library_path"]

#: The fused CPU ops (``FusedCpuDecl.op``) that also bin the staleness
#: (:mod:`fasthist.reference.staleness`) in their sweep; :mod:`fasthist.dispatch` sends a
#: call with staleness windows to no other.
TRACKS_STALENESS = ("fused_adam_hist_",)
