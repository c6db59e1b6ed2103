"""The small models the optimizer tests train twice (torch's optimizer and fasthist's, from
the same weights and data) and the pair run that compares them bit for bit."""

import copy

import torch
from torch import nn


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))


def convnet():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 20)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x))[0])


MODELS = {
    "mlp": (mlp, lambda g: torch.randn(16, 12, generator=g)),
    "conv": (convnet, lambda g: torch.randn(8, 1, 8, 8, generator=g)),
    "lstm": (LSTMNet, lambda g: torch.randint(0, 20, (4, 7), generator=g)),
}


def twin(kind):
    build, data = MODELS[kind]
    torch.manual_seed(0)
    a = build()
    b = copy.deepcopy(a)
    return a, b, data


def loss_of(model, x):
    return model(x).float().pow(2).mean()


def run_pair(kind, make_ref, make_fh, steps=50, group_fn=None, after_step=None):
    """``steps`` steps of ``make_ref`` and ``make_fh`` on twin models of ``kind``; parameters
    and states must end bit for bit equal (the reference backend runs torch's own update)."""
    ref_model, fh_model, data = twin(kind)
    params = group_fn if group_fn is not None else (lambda m: m.parameters())
    ref_opt, fh_opt = make_ref(params(ref_model)), make_fh(params(fh_model))
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = data(g)
        for m, o in ((ref_model, ref_opt), (fh_model, fh_opt)):
            o.zero_grad()
            loss_of(m, x).backward()
            o.step()
        if after_step is not None:
            after_step(i, ref_opt, fh_opt)
    for p, q in zip(ref_model.parameters(), fh_model.parameters(), strict=True):
        assert torch.equal(q, p)
    for p, q in zip(ref_model.parameters(), fh_model.parameters(), strict=True):
        for k, v in ref_opt.state[p].items():
            assert torch.equal(fh_opt.state[q][k], v)
    return ref_model, fh_model, ref_opt, fh_opt
