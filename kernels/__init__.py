"""Triton kernels of fasthist, installed as ``fasthist.kernels``.

Importing this package needs Triton; :mod:`fasthist.dispatch` treats an ImportError as
"no kernels here" and runs another backend. Under ``TRITON_INTERPRET=1`` (set before this
package is first imported) the same kernels run on CPU tensors. Checked with Triton 3.9 and
3.6 (the GPU machine's): the kernels build and run under both interpreters; 3.6's
interpreter rounds ``tl.fma`` twice, so the bit-exact CPU tests need Triton >= 3.9.

One module per optimizer, named as the optimizer's declaration names it
(:class:`fasthist.declaration.OptimizerDecl`, ``kernel``), each laid out as: module
docstring (the math) → ``@triton.jit`` kernel → launcher → ``<op>_hist`` wrapper taking
exactly the arguments of the optimizer's functional form plus ``hist`` (a
:class:`fasthist.target.HistTarget` or None). They are imported when first used.

Everything they share lives in :mod:`._common`: the histogram (:mod:`._histogram`: a private
shared-memory histogram per program on the GPU, its twin on the interpreter, ``tl.histogram``
as the fallback), the launch shape (:func:`configure`, for every kernel) and the multi-tensor
tables. Which calls they run is :mod:`fasthist.dispatch`'s decision, not theirs.
"""

import triton  # noqa: F401

from ._common import MAX_BINS, SHAPE, configure  # noqa: F401

__all__ = ["MAX_BINS", "SHAPE", "configure"]
