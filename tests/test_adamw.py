"""fasthist.AdamW against torch.optim.AdamW: a thin subclass of fasthist.Adam (decoupled weight
decay, default 1e-2), as torch's AdamW is of Adam. What it shares with Adam is in
test_adam.py; step for step on raw tensors, bad arguments and backends in test_contract.py."""

import pytest
import torch
from _models import run_pair
from _optim_db import ADAM_CONFIGS

import fasthist


@pytest.mark.parametrize("config", ["defaults", "amsgrad", "maximize", "fused"])
def test_adamw_matches_torch(config):
    kw = ADAM_CONFIGS[config]
    _, fh_model, _, fh_opt = run_pair("mlp", lambda p: torch.optim.AdamW(p, **kw), lambda p: fasthist.AdamW(p, **kw))
    assert isinstance(fh_opt, torch.optim.Adam)
    assert all(g["decoupled_weight_decay"] and g["weight_decay"] == 1e-2 for g in fh_opt.param_groups)


def test_adamw_is_a_torch_adamw():
    opt = fasthist.AdamW([torch.zeros(2, requires_grad=True)])
    assert isinstance(opt, torch.optim.AdamW) and isinstance(opt, torch.optim.Adam)
