"""The ``fasthist`` command (also ``python -m fasthist``).

- ``fasthist eps-range``: the paper's ε-range rule on an embedded task, at the model's
  initial weights (nothing is trained): a per-tensor table, the range and its candidate
  decades; writes ``eps_range.json``, ``histograms.png`` and ``adaptability.png``.
- ``fasthist sweep``: trains the task with the default optimizer once per ε of the conventional grid (and
  per seed), reports the validation metric per ε, the best ε, whether the range holds
  it and how many grid points the range saves; writes ``sweep.json``, ``sweep.png`` and
  ``quantiles.png``.
- ``fasthist bench``: time of one optimizer step against the torch optimizer it replaces,
  as ratios.

Bad arguments end with a one-line error and exit status 2; failures while running end
with a one-line error and status 1 (``FASTHIST_DEBUG=1`` shows the traceback).

One module per command (:mod:`.eps_range`, :mod:`.sweep`, :mod:`.bench`: ``add_parser``
and ``run``), argument types in :mod:`.args`, tables and output files in :mod:`.output`,
the parser and exit statuses in :mod:`.app`.
"""

from __future__ import annotations

from .app import build_parser, main

__all__ = ["build_parser", "main"]
