import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Each test starts from FASTHIST_BACKEND=auto unless it sets otherwise."""
    if os.environ.get("FASTHIST_BACKEND") not in (None, "auto"):
        monkeypatch.delenv("FASTHIST_BACKEND")
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
