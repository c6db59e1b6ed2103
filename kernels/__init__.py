"""Triton kernels of fasthist, installed as ``fasthist.kernels``.

Importing this package needs Triton; ``fasthist.backend`` treats an ImportError as
"no kernels here" and uses the pure-PyTorch reference. Under ``TRITON_INTERPRET=1`` (set
before this package is first imported) the same kernels run on CPU tensors. Checked on
2026-11-28 with Triton 3.9 and 3.6 (the GPU machine's): the kernels build and run under
both interpreters; 3.6's interpreter rounds ``tl.fma`` twice, so the bit-exact CPU tests
need Triton >= 3.9 (they pass on 3.6 too once its interpreter's fma rounds once).

One module per optimizer, each laid out as: module docstring (the math) → ``@triton.jit``
kernel → launcher → ``<op>_hist`` wrapper taking exactly the arguments of torch's functional
form plus ``hist`` (a :class:`fasthist.reference.histogram.HistTarget` or None):

- :mod:`.adam`: Adam/AdamW (:func:`fasthist.kernels.adam.adam_hist`; launch shape in
  ``adam.configure(block, iters, num_warps)``).

Shared pieces for new kernels live in :mod:`._common`:

- ``bin_index(x, SHIFT, LOW_KEY, ABOVE, NONFINITE)``: LogBins index of float32 values, in
  the kernel; ``BinSpec(bins).kwargs()`` gives those constexprs (plus ``NUM_BINS`` and
  ``HIST_BINS``, the power of two ``tl.histogram`` needs).
- ``flush_histogram(acc, scratch_row_ptr, NUM_BINS, HIST_BINS)``: once per program, atomics
  on the non-zero bins of a ``tl.histogram`` accumulator into the tensor's scratch row.
- ``scratch_for(target, n)`` and ``finalize_histograms(target, scratch, found_inf)``: the
  call's int64 scratch and the one launch that turns it into the ``step``/``total`` windows
  (skipped on ``found_inf``) and re-zeroes it.
- ``TensorTable.get(device, columns, numels, slots, chunk)``: cached table of ``data_ptr``s
  (one row per tensor: the columns' pointers, numel, slot) and chunk descriptors
  ``(row, start)``, one per program; load a pointer in the kernel with
  ``tl.load(table + width * row + k).to(tl.pointer_type(DTYPE))``.
- ``dense_views(tensors)``: the tensors themselves when a flat walk is valid (same dense
  strides), else contiguous copies to write back.
- ``launch_options(device)``: ``enable_fp_fusion=False`` on the GPU, so roundings are the
  ones written (use ``tl.fma`` where torch's CPU kernels fuse).
"""

import triton  # noqa: F401

from . import adam  # noqa: E402,F401

#: Largest ``LogBins.num_bins`` the fused kernels take: the per-program ``tl.histogram``
#: holds ``next_power_of_2(num_bins)`` counters (4096 for the default bins, checked to
#: compile for sm_90 without spills). Finer bins run on the reference backend instead,
#: with a warning, rather than risk a kernel that spills or does not compile.
MAX_BINS = 4096
