import os

import torch

# The Triton backend runs CPU tensors only under its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import flowkern  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts on the default backend with finite checks on, and a fixed seed it may override."""
    flowkern.set_backend("auto")
    flowkern.set_finite_checks(True)
    torch.manual_seed(0)
    yield
    flowkern.set_backend("auto")


KERNEL_BACKENDS = [name for name in ("triton", "cuda", "cpp") if name in flowkern.backends()]
