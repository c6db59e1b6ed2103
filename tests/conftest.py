import contextlib
import os

import pytest
import torch

# Without CUDA the kernel tests run under Triton's interpreter, which Triton chooses when it is
# first imported: set it here, before any test module (or torch.compile's inductor) imports
# Triton, so the outcome does not depend on which test files run or in what order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Tests pick a backend with ``fasthist.backend.use`` (or the ``use_backend`` fixture);
    FASTHIST_BACKEND set outside, e.g. ``FASTHIST_BACKEND=triton TRITON_INTERPRET=1 pytest
    tests/test_adam.py``, runs the rest of a file on that backend."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_selftest(monkeypatch):
    """The device self-test (fasthist.selftest) off, except where a test module turns it back
    on (tests/test_selftest.py, tests/test_cli_check.py): the kernel tests compare every
    kernel with its reference themselves, so the self-test would only repeat that at 1.5-5 s
    per specialisation under the interpreter, and a self-test that routed a call away from
    the kernel would leave those tests checking the reference against itself."""
    monkeypatch.setenv("FASTHIST_SELFTEST", "0")


@pytest.fixture
def use_backend():
    """``use_backend(name)``: ``fasthist.backend.use(name)`` for the rest of the test."""
    from fasthist import backend

    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(backend.use(name))


def _interpreter_fma_rounds_once() -> bool:
    # Triton 3.6's interpreter computes tl.fma as x*y+z in float32 (two roundings); 3.9's
    # rounds once, like the hardware. With a once-rounding fma patched in, every kernel
    # test also passes on 3.6's interpreter (checked 2026-11-28).
    try:
        import triton
    except ImportError:
        return True
    return tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)


def pytest_collection_modifyitems(config, items):
    if not _interpreter_fma_rounds_once():
        fma = pytest.mark.skip(
            reason="this Triton's interpreter rounds tl.fma twice: bit-exact kernel tests need >= 3.9"
        )
        for item in items:
            in_kernel_file = item.fspath.basename in ("test_kernels_adam.py", "test_kernels_others.py")
            if (in_kernel_file or item.get_closest_marker("interpreter")) and not item.get_closest_marker("gpu"):
                item.add_marker(fma)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker, not a keyword: keywords also hold directory names (a checkout named gpu)
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
