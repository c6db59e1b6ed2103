"""Triton kernels of fasthist, installed as ``fasthist.kernels``.

Importing this package needs Triton; ``fasthist.backend`` treats an ImportError as
"no kernels here" and uses the pure-PyTorch reference. Under ``TRITON_INTERPRET=1`` (set
before this package is first imported) the same kernels run on CPU tensors. Checked with
Triton 3.9 and 3.6 (the GPU machine's): the kernels build and run under both interpreters;
3.6's interpreter rounds ``tl.fma`` twice, so the bit-exact CPU tests need Triton >= 3.9.

One module per optimizer, each laid out as: module docstring (the math) → ``@triton.jit``
kernel → launcher → ``<op>_hist`` wrapper taking exactly the arguments of torch's functional
form plus ``hist`` (a :class:`fasthist.target.HistTarget` or None):

- :mod:`.adam`: Adam/AdamW (:func:`fasthist.kernels.adam.adam_hist`);
- :mod:`.rmsprop`, :mod:`.adagrad`, :mod:`.adabelief`: the other optimizers.

Everything they share lives in :mod:`._common`: the histogram (:mod:`._histogram`: a private
shared-memory histogram per program on the GPU, its twin on the interpreter, ``tl.histogram``
as the fallback), the launch shape (:func:`configure`, for every kernel), the multi-tensor
tables, and :func:`kernel_supports`, the one place that decides kernel or reference.
"""

import triton  # noqa: F401

from . import adabelief, adagrad, adam, rmsprop  # noqa: F401
from ._common import MAX_BINS, SHAPE, configure, kernel_supports  # noqa: F401

__all__ = ["MAX_BINS", "SHAPE", "configure", "kernel_supports", "adam", "rmsprop", "adagrad", "adabelief"]
