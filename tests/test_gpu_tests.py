"""The gpu-marked tests, checked on a CPU machine before they ever reach a GPU: each one that runs a backend runs
one that takes CUDA tensors (a CPU-only backend on CUDA tensors raises at its first GPU run)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flowkern

ROOT = Path(__file__).resolve().parents[1]

# Collects the gpu-marked tests in a child pytest (collection only) and prints (node id, backend under test).
_COLLECT = r"""
import json, sys
import pytest
from tests.conftest import backend_under_test

class Report:
    def pytest_collection_finish(self, session):
        self.items = [(item.nodeid, backend_under_test(item)) for item in session.items]

report = Report()
code = pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], plugins=[report])
print("GPU-TESTS " + json.dumps(report.items))
sys.exit(0 if code in (0, 5) else code)
"""


def _collect_gpu_tests() -> list[tuple[str, str | None]]:
    done = subprocess.run([sys.executable, "-c", _COLLECT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("GPU-TESTS "))
    return [tuple(item) for item in json.loads(line[len("GPU-TESTS "):])]


def cuda_incapable(items) -> list[tuple[str, str]]:
    """The (node id, backend) pairs whose backend cannot take CUDA tensors."""
    return [(node, name) for node, name in items
            if name is not None and "cuda" not in flowkern.backend.DEVICE_TYPES.get(name, ())]


def test_the_check_catches_a_cpu_only_backend():
    items = [("tests/ops/test_x.py::test_gpu[cpp]", "cpp"), ("tests/ops/test_x.py::test_gpu[triton]", "triton"),
             ("tests/ops/test_x.py::test_gpu_plain", None)]
    assert cuda_incapable(items) == [("tests/ops/test_x.py::test_gpu[cpp]", "cpp")]


def test_every_gpu_test_runs_a_backend_that_takes_cuda_tensors():
    items = _collect_gpu_tests()
    assert cuda_incapable(items) == []
    # The collection is real: the op families' and the fused Glow's GPU tests are all there, on both CUDA backends.
    nodes = [node for node, _ in items]
    for family in ("actnorm", "coupling_epilogue", "invconv", "prior", "mlp_coupling", "glow"):
        assert any(node.startswith(f"tests/ops/test_{family}.py::") for node in nodes), family
    assert any(node.startswith("tests/nn/test_train_step.py::") for node in nodes)
    assert {name for _, name in items if name is not None} == {"triton", "cuda"}
