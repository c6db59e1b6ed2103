import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Tests that set FASTHIST_BACKEND use monkeypatch (undone after each test); one set
    outside, e.g. ``FASTHIST_BACKEND=triton TRITON_INTERPRET=1 pytest tests/test_adam.py``,
    runs the whole file on that backend."""
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
