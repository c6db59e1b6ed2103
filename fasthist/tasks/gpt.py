"""``gpt``: a small decoder-only transformer in the style of GPT-2 on the same CPython
documentation text as ``charlm`` (UTF-8 bytes, the same 90/10 split, perplexity per byte).

Two blocks of pre-LayerNorm causal self-attention (2 heads, one fused ``qkv`` projection
with biases, as GPT-2's ``c_attn``) and a GELU MLP; learned positions; the output layer is
the token embedding (tied). The key third of each ``qkv.bias`` has an exactly zero
gradient in exact arithmetic (adding the same vector to every key shifts each query's
scores by a constant, which softmax ignores): what fasthist histograms there is float32
rounding noise, a numerically dead tensor (see :data:`fasthist.eps.DEAD_RATIO`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .charlm import CharLM

__all__ = ["GPT"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class _GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        for m in self.modules():  # GPT-2's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.tok.weight.t()  # tied: the embedding is the output layer


class GPT(CharLM):
    name = "gpt"
    metric = "perplexity"
    higher_is_better = False
    eps_grid = tuple(10.0**e for e in range(-9, -2))  # the paper's Penn Treebank grid, as charlm
    epochs = 1
    lr = 3e-3
    dim = 32
    heads = 2
    layers = 2

    def describe(self) -> str:
        return (
            f"gpt: {self.layers}-block transformer (dim {self.dim}, {self.heads} heads, tied embedding) on "
            f"pydoc_data.topics, {self.vocab} byte values ({self.unused_rows} unused), "
            f"{len(self.train_seqs)} train / {len(self.val_seqs)} val sequences of {self.seq_len}"
        )

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return _GPT(self.vocab, self.dim, self.heads, self.layers, self.seq_len).to(self.device)

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
