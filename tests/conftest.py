import os

import torch

# The Triton backend runs CPU tensors only under its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import flowkern  # noqa: E402
from tests.background import BACKGROUND  # noqa: E402
from tests.models.tiny_bert import write_tiny_bert  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_finish(session):
    """Tests whose module defines start_in_background(item) (the compiler checks) queue their slow commands as
    soon as the run is known (tests/background.py). Not in a pytest-xdist worker, which collects every test but
    runs only some: there each test starts its own."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    for item in session.items:
        start = getattr(getattr(item, "module", None), "start_in_background", None)
        if start is not None:
            start(item)


def pytest_sessionfinish(session):
    BACKGROUND.cancel_pending()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def backend_under_test(item) -> str | None:
    """The backend a parametrized test runs (its "impl" or "backend" parameter), if any."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("impl", params.get("backend"))


def pytest_runtest_setup(item):
    """A gpu test of a CUDA backend this machine cannot run (flowkern._C built without CUDA) is skipped, or fails
    where the extension is required (make test, gpu_check.sh), so a missing build cannot pass unnoticed."""
    name = backend_under_test(item)
    if "gpu" not in item.keywords or name is None or not torch.cuda.is_available():
        return
    if not flowkern.backend.usable_on(name, torch.device("cuda")):
        why = f"backend {name!r} cannot run CUDA tensors here: {flowkern.backend._why_unusable(name)}"
        pytest.fail(why) if os.environ.get("FLOWKERN_REQUIRE_EXTENSION") == "1" else pytest.skip(why)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts on the default backend with finite checks on, and a fixed seed it may override."""
    flowkern.set_backend("auto")
    flowkern.set_finite_checks(True)
    torch.manual_seed(0)
    yield
    flowkern.set_backend("auto")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sts_data_dir() -> Path:
    """$FLOWKERN_DATA, else the shared data next to the repository (../shared/data/sts).

    A directory named by FLOWKERN_DATA must exist (make test and CI set it): only a bare pytest run without the
    data skips these tests."""
    configured = os.environ.get("FLOWKERN_DATA")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "shared" / "data" / "sts"
    if not (path / "stsb-test.tsv.gz").is_file():
        message = f"STS data not found at {path}; set FLOWKERN_DATA"
        pytest.fail(message) if configured else pytest.skip(message)
    return path


KERNEL_BACKENDS = [name for name in ("triton", "cuda", "cpp") if name in flowkern.backends()]
# The gpu-marked tests hand CUDA tensors to these: every kernel backend that takes them, whether or not this machine
# can run it (tests/test_gpu_tests.py checks that no gpu test uses another).
GPU_KERNEL_BACKENDS = [name for name in ("triton", "cuda", "cpp") if "cuda" in flowkern.backend.DEVICE_TYPES[name]]
