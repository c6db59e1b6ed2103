"""Optional integrations with other tools; each imports its tool only when used.

- :mod:`.tensorboard`: ``log_histograms(writer, opt, step)``, the real bins to TensorBoard.
- :mod:`.wandb`: ``log_histograms(run, opt, step)``, the real bins to Weights & Biases.
- :mod:`.transformers`: ``HistogramCallback`` for Hugging Face's ``Trainer``.
- :mod:`.lightning`: ``HistogramCallback`` for Lightning's ``Trainer``.

:mod:`.metrics` computes what they log; :mod:`.callbacks` holds what both callbacks share.
"""
