"""``charlm``: a character-level LSTM language model on the CPython documentation text
that ships with every Python (``pydoc_data.topics``, about 465k characters), read as
UTF-8 bytes: the first 90% for training, the last 10% for validation, perplexity per byte.

The vocabulary is all 256 byte values; the rows of bytes that never occur in the training
text never receive a gradient, so their sqrt(v_hat) is exactly zero (the rule drops it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task

__all__ = ["CharLM", "load_text"]


def load_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


class _LSTMLM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.lstm(self.embed(x))
        return self.head(h)


class CharLM(Task):
    name = "charlm"
    metric = "perplexity"
    higher_is_better = False
    eps_grid = tuple(10.0**e for e in range(-9, -2))  # the paper's Penn Treebank grid, 1e-9 ... 1e-3
    epochs = 3
    lr = 2e-3
    clip_grad_norm = None
    seq_len = 64
    batch_size = 32
    vocab = 256
    embed = 32
    hidden = 128

    def __init__(self, *, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed=seed, device=device)
        text = load_text()
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)
        n_train = int(len(ids) * 0.9)
        span = self.seq_len + 1
        train, val = ids[:n_train], ids[n_train:]
        self.train_seqs = train[: len(train) // span * span].view(-1, span).to(self.device)
        self.val_seqs = val[: len(val) // span * span].view(-1, span).to(self.device)
        self.unused_rows = self.vocab - int(torch.unique(self.train_seqs).numel())

    def describe(self) -> str:
        return (
            f"charlm: LSTM({self.embed}->{self.hidden}) on pydoc_data.topics, {self.vocab} byte values ({self.unused_rows} unused), "
            f"{len(self.train_seqs)} train / {len(self.val_seqs)} val sequences of {self.seq_len}"
        )

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return _LSTMLM(self.vocab, self.embed, self.hidden).to(self.device)

    def batches(self, epoch: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train_seqs), generator=g).to(self.device)
        return [self.train_seqs[idx] for idx in perm.split(self.batch_size) if len(idx) == self.batch_size]

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        for seqs in self.val_seqs.split(256):
            logits = model(seqs[:, :-1])
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1), reduction="sum")
            )
            count += seqs[:, 1:].numel()
        return math.exp(total / count)
