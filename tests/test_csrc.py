"""The compiled extension's build: flowkern._C loads where it must, every CUDA source compiles for Hopper with nvcc
(torch-free, no GPU needed), the torch-free C++ unit tests pass, and the compiled ops reject bad input by name.

The "cpp" backend itself is tested op by op against the float64 references in tests/ops/ (KERNEL_BACKENDS). The
compilers run in the background from the start of the run (tests/background.py); the tests wait for them."""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import flowkern
from flowkern import backend
from tests.background import BACKGROUND, run_in_order

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
# The compilers' outputs, for this run only.
_BUILDS = tempfile.TemporaryDirectory(prefix="flowkern-test-csrc-")
needs_extension = pytest.mark.skipif("cpp" not in flowkern.backends(), reason="flowkern._C is not built here")


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def test_extension_loads_where_required():
    # make test (and so CI) builds the extension: a build that silently failed would skip every "cpp" test.
    if os.environ.get("FLOWKERN_REQUIRE_EXTENSION") != "1":
        pytest.skip("FLOWKERN_REQUIRE_EXTENSION is not set")
    assert backend._EXTENSION is not None, backend._EXTENSION_ERROR
    assert "cpp" in flowkern.backends()


def test_cuda_sources_exist():
    # ActNorm and the prior are channelwise ops (csrc/ops/): the engine in channelwise.cu runs them.
    assert {p.stem for p in CUDA_SOURCES} >= {"channelwise", "coupling_epilogue", "invconv", "mlp_coupling"}


def _nvcc_job(source: Path):
    """(name, job) compiling one CUDA source for Hopper."""
    command = [_nvcc(), "-std=c++17", "-O3", "-arch=sm_90", "-c", str(source), "-I", str(ROOT / "csrc"), "-o",
               str(Path(_BUILDS.name) / f"{source.stem}.o")]
    return f"nvcc {source.name}", functools.partial(run_in_order, [command], timeout=600)


def _cmake_job():
    """(name, job) of the CMake build and its C++ unit tests; one compiler at a time, as the tests run beside it."""
    build = str(Path(_BUILDS.name) / "cmake")
    commands = [["cmake", "-S", str(ROOT), "-B", build, "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", build, "--parallel", "1"],
                ["ctest", "--test-dir", build, "--output-on-failure"]]
    return "cmake", functools.partial(run_in_order, commands, timeout=900)


def start_in_background(item) -> None:
    """Queues the compiler run of a collected test at the start of the run (tests/conftest.py)."""
    if item.originalname == "test_cuda_source_compiles_for_hopper" and _nvcc() is not None:
        BACKGROUND.submit(*_nvcc_job(item.callspec.params["source"]))
    elif item.originalname == "test_cpp_unit_tests_pass" and shutil.which("cmake") is not None:
        BACKGROUND.submit(*_cmake_job())


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_hopper(source):
    _, result = BACKGROUND.result(*_nvcc_job(source))
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cpp_unit_tests_pass():
    command, result = BACKGROUND.result(*_cmake_job())
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


@needs_extension
def test_compiled_ops_name_bad_input():
    ops = torch.ops.flowkern_C
    x, c = torch.randn(4, 6), torch.randn(6)
    with pytest.raises(ValueError, match=r"actnorm_fwd: bias must have shape \[6\]"):
        ops.actnorm_fwd(x, torch.randn(5), c, 3.0)
    with pytest.raises(ValueError, match="actnorm_fwd: x must be float16, bfloat16, float32 or float64"):
        ops.actnorm_fwd(x.long(), c, c, 3.0)
    with pytest.raises(ValueError, match=r"x must be \[B, C\] or \[B, C, H, W\]"):
        ops.actnorm_fwd(torch.randn(4, 6, 2), c, c, 3.0)
    with pytest.raises(ValueError, match="empty batch"):
        ops.actnorm_fwd(torch.randn(0, 6), c, c, 3.0)
    with pytest.raises(ValueError, match="coupling_epilogue_fwd: h must have 2 x the channels of x2"):
        ops.coupling_epilogue_fwd(torch.randn(4, 3), torch.randn(4, 3), True)
    with pytest.raises(ValueError, match="hidden width must be in"):
        w = [torch.randn(65, 3), torch.randn(65), torch.randn(65), torch.randn(65, 65), torch.randn(65),
             torch.randn(65), torch.randn(3, 65), torch.randn(3), torch.randn(3)]
        ops.mlp_coupling_fwd(torch.randn(4, 3), torch.randn(4, 3), w, False, 3.0)
    with pytest.raises(ValueError, match="LU factors must be float32 or float64"):
        ops.lu_weight_fwd(torch.arange(3), torch.randn(3, 3).half(), torch.randn(3, 3), torch.ones(3),
                          torch.zeros(3))
