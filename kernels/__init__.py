"""Triton kernels of fasthist, installed as ``fasthist.kernels``.

Importing this package needs Triton; :mod:`fasthist.dispatch` treats an ImportError as
"no kernels here" and runs another backend. Under ``TRITON_INTERPRET=1`` (set before this
package is first imported) the same kernels run on CPU tensors. Checked with Triton 3.9 and
3.6 (the GPU machine's): the kernels build and run under both interpreters; 3.6's
interpreter rounds ``tl.fma`` twice, so the bit-exact CPU tests need Triton >= 3.9.

One module per optimizer, named as the optimizer's declaration names it
(:class:`fasthist.declaration.OptimizerDecl`, ``kernel``), each laid out as: module
docstring (the math) → its switches (a ``NamedTuple``) → ``@triton.jit`` ``prepare`` and
``update`` bodies, and ``staleness`` where the optimizer defines one (``BODY``, a
:class:`._common.StepBody`) → ``<op>_hist`` launcher taking
exactly the arguments of the optimizer's functional form plus ``hist`` (a
:class:`fasthist.target.HistTarget` or None), its inputs readied by
:func:`fasthist.backend.stepped` (step counts, ``found_inf``, ``grad_scale``, ``lr``). They
are imported when first used.

Everything they share lives in :mod:`._common`: the one kernel every optimizer runs in
(:func:`._common.fused_step_kernel`: the chunk, its columns, the ``found_inf`` mask, full and
tail chunks, the histogram; the body passed as a constexpr function), the histogram
(:mod:`._histogram`: a private shared-memory histogram per program on the GPU, its twin on
the interpreter, ``tl.histogram`` as the fallback; its layout one constexpr,
:class:`._histogram.BinLayout`), the launch shape (:func:`configure`, for every kernel) and
the multi-tensor tables. Which calls they run is :mod:`fasthist.dispatch`'s decision, not
theirs.
"""

import sys

if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess by the tests
    # Imported as a top-level ``kernels``: this folder was found only because a checkout's
    # root is on sys.path (a script or ``python -m`` run from it). The name belongs to
    # whatever ``kernels`` is installed (Hugging Face's, which transformers >= 5.25
    # imports), so step aside for it; this package is ``fasthist.kernels``.
    from ._shadow import step_aside

    sys.modules[__name__] = step_aside(__file__)
    del sys.modules[__name__ + "._shadow"]  # fasthist's, not a submodule of what replaced it
else:
    import importlib

    import triton  # noqa: F401

    from ._common import MAX_BINS, SHAPE, configure, current_histogram_choice, histogram_choice  # noqa: F401

    def tracks_staleness(module: str) -> bool:
        """Whether the kernel module ``module`` (an optimizer declaration's ``kernel[0]``)
        takes a :class:`fasthist.target.HistTarget` whose ``staleness`` windows are set, and
        histograms both quantities in the same launch: its body (``BODY``) defines a
        staleness; the others raise ValueError for such a target."""
        return importlib.import_module(f"{__name__}.{module}").BODY.staleness is not None

    __all__ = [
        "MAX_BINS",
        "SHAPE",
        "configure",
        "current_histogram_choice",
        "histogram_choice",
        "tracks_staleness",
    ]
