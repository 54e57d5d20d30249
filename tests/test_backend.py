import pytest
import torch

import flowkern
from flowkern import backend, ops


def test_torch_backend_is_always_usable():
    assert "torch" in flowkern.backends()
    assert set(flowkern.backends()) <= {"torch", "triton", "cuda", "cpp"}


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        flowkern.set_backend("tpu")


@pytest.mark.skipif("cuda" in flowkern.backends(), reason="the extension is built here")
def test_unusable_backend_says_why():
    with pytest.raises(ValueError, match="not usable here: the compiled extension"):
        flowkern.set_backend("cuda")


def test_use_backend_is_scoped():
    flowkern.set_backend("auto")
    with flowkern.use_backend("torch"):
        assert flowkern.current_backend() == "torch"
    assert flowkern.current_backend() == "auto"


def test_auto_never_picks_the_triton_interpreter_on_cpu():
    assert backend.resolve(torch.zeros(1), "actnorm") in ("cpp", "torch")


def test_explicit_backend_without_the_op_raises():
    with flowkern.use_backend("torch"):
        with pytest.raises(NotImplementedError, match="no 'torch' implementation"):
            backend.resolve(torch.zeros(1), "some_fused_op", available=("triton",))


def test_ops_match_module_math():
    x = torch.randn(4, 6, dtype=torch.float64)
    bias, logs = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64) * 0.1
    y, log_det = ops.actnorm(x, bias, logs, 3.0)
    torch.testing.assert_close(y, (x + bias) * torch.exp(3 * logs))
    torch.testing.assert_close(log_det, (3 * logs.sum()).expand(4))


@pytest.mark.skipif("cpp" not in flowkern.backends(), reason="flowkern._C is not built here")
def test_auto_prefers_the_compiled_cpu_kernels_where_measured_faster():
    x = torch.zeros(2, 4)
    assert backend.resolve(x, "actnorm") == "cpp"
    assert backend.resolve(x, "glow", ("torch", "triton", "cpp")) == "cpp"
    assert backend.resolve(x, "coupling_epilogue") == "torch"          # measured no faster standalone
    with flowkern.use_backend("cpp"):                         # an explicit choice is honoured
        assert backend.resolve(x, "coupling_epilogue") == "cpp"
