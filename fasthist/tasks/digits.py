"""``digits``: the 8x8 handwritten digits that ship inside scikit-learn (1797 images, 10
classes), a small conv net, accuracy on a fixed held-out 20%."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import Task

__all__ = ["Digits"]


class Digits(Task):
    name = "digits"
    metric = "accuracy"
    higher_is_better = True
    eps_grid = tuple(10.0**e for e in range(-8, 0))  # the paper's CIFAR-10 grid, 1e-8 ... 1e-1
    epochs = 20
    lr = 1e-3
    batch_size = 32

    def __init__(self, *, seed: int = 0, device: str = "cpu") -> None:
        super().__init__(seed=seed, device=device)
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise RuntimeError("the digits task needs scikit-learn: pip install -e '.[demo]'") from e
        x, y = load_digits(return_X_y=True)
        order = np.random.RandomState(0).permutation(len(y))  # the split never moves with --seed
        n_val = len(y) // 5
        x = torch.tensor(x[order] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        y = torch.tensor(y[order], dtype=torch.int64)
        self.x_val, self.y_val = x[:n_val].to(self.device), y[:n_val].to(self.device)
        self.x_train, self.y_train = x[n_val:].to(self.device), y[n_val:].to(self.device)

    def describe(self) -> str:
        return f"digits: conv net on sklearn's 8x8 digits, {len(self.y_train)} train / {len(self.y_val)} val images"

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        ).to(self.device)

    def batches(self, epoch: int) -> list[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.y_train), generator=g).to(self.device)
        return [
            (self.x_train[idx], self.y_train[idx]) for idx in perm.split(self.batch_size) if len(idx) == self.batch_size
        ]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        pred = model(self.x_val).argmax(dim=1)
        return 100.0 * float((pred == self.y_val).to(torch.float32).mean())
