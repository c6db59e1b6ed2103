"""Small real tasks that ship with the package, for ``fasthist eps-range`` and ``fasthist sweep``.

Both use only data that is already on the machine, never the network:

- ``digits``: the 8x8 handwritten digits inside scikit-learn
  (``sklearn.datasets.load_digits``), a small conv net, validation accuracy.
- ``charlm``: a character-level LSTM language model on the CPython documentation text
  that ships with every Python (``pydoc_data.topics``), validation perplexity.
- ``gpt``: a small GPT-2-style transformer (fused q/k/v projection with biases, LayerNorm,
  tied embedding) on the same text, validation perplexity.

Everything random (initialisation, batch order) follows ``seed``; the train/validation
split is fixed. The conventional ε grids are the paper's: 1e-8 ... 1e-1 for the image
classifier (its CIFAR-10 grid), 1e-9 ... 1e-3 for the language model (its Penn Treebank
grid).
"""

from __future__ import annotations

from .base import Task, TrainResult, train

__all__ = ["TASKS", "Task", "TrainResult", "get_task", "train"]

TASKS = ("digits", "charlm", "gpt")


def get_task(name: str, *, seed: int = 0, device: str = "cpu") -> Task:
    """Build task ``name`` (data loaded onto ``device``)."""
    if name == "digits":
        from .digits import Digits

        return Digits(seed=seed, device=device)
    if name == "charlm":
        from .charlm import CharLM

        return CharLM(seed=seed, device=device)
    if name == "gpt":
        from .gpt import GPT

        return GPT(seed=seed, device=device)
    raise ValueError(f"Invalid task: {name!r}; expected one of {', '.join(TASKS)}")
