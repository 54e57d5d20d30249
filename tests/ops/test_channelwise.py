"""The Triton engine of the channelwise ops (flowkern/kernels/triton/channelwise.py) as the GPU compiles it: every
op's launches, recorded on the CPU, compile for Hopper (sm_90) without spills; and no Triton kernel has an argument
name that breaks a GPU launch; each launcher agrees with its op's declaration and names bad arguments. The ops' results are tested against
their float64 references in test_actnorm.py and test_prior.py (every backend)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import flowkern.kernels.triton
from flowkern.kernels.triton import actnorm, prior
from flowkern.kernels.triton.channelwise import Channelwise
from flowkern.ops.spec import SPECS
from tests.ops.kernel_checks import MAX_SPILL_BYTES, hopper_resources, needs_hopper_toolchain, recorded_launches

ENGINE = "flowkern.kernels.triton.channelwise"
TRITON_MODULES = [f"flowkern.kernels.triton.{m.name}" for m in pkgutil.iter_modules(flowkern.kernels.triton.__path__)]


def _launches(shape, dtype) -> None:
    x, dy = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    bias, logs, grad_rows = torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape[0])
    actnorm.actnorm_fwd(x, bias, logs, 3.0)
    actnorm.actnorm_inv(x, bias, logs, 3.0)
    actnorm.actnorm_bwd(dy, grad_rows.expand(shape[0]), x, bias, logs, 3.0)
    prior.gaussian_log_prob_fwd(x)
    prior.gaussian_log_prob_bwd(grad_rows, x)


@needs_hopper_toolchain
def test_every_op_compiles_for_hopper_without_spills():
    cases = []
    for shape, dtype in [((4096, 768), torch.float32), ((64, 48, 16, 16), torch.bfloat16)]:
        cases += recorded_launches(ENGINE, lambda: _launches(shape, dtype))
    assert len(cases) == 2 * 6 and {c["kernel"] for c in cases} == {
        "_map_kernel", "_row_sums_kernel", "_channel_partials_kernel", "_channel_reduce_kernel"}
    resources = hopper_resources(cases)
    assert max(r["stack"] for r in resources) <= MAX_SPILL_BYTES, [
        (c["kernel"], c["launch"]["kwargs"].get("ELEMENT"), r["stack"]) for c, r in zip(cases, resources)]


def test_no_kernel_argument_shadows_the_launch_binder():
    """Triton 3.6 binds a launch's arguments in generated code whose locals are `params`, `specialization` and
    `options`: a kernel argument of one of those names fails to specialize, on a GPU only (the interpreter does not
    bind). Every kernel (a @triton.jit function named *_kernel) in flowkern.kernels.triton avoids them."""
    kernels = [(module.__name__, name, kernel) for module in map(importlib.import_module, TRITON_MODULES)
               for name, kernel in vars(module).items() if name.endswith("_kernel") and hasattr(kernel, "fn")]
    assert len(kernels) > 10
    for module, name, kernel in kernels:
        clashing = set(inspect.signature(kernel.fn).parameters) & {"params", "specialization", "options"}
        assert not clashing, (module, name, clashing)


def test_triton_declarations_agree_with_the_op_specs():
    """Each Triton channelwise launcher names the arguments of its op's one declaration (flowkern.ops.spec), in
    order, floats as scalars and tensors in a tensor role."""
    ops = [op for module in map(importlib.import_module, TRITON_MODULES) for op in vars(module).values()
           if isinstance(op, Channelwise)]
    assert {op.name for op in ops} >= {"actnorm_fwd", "actnorm_inv", "actnorm_bwd", "gaussian_log_prob_fwd",
                                       "gaussian_log_prob_bwd"}
    for op in ops:
        declared = SPECS[op.name].args
        assert [name for name, _ in op.arguments] == [name for name, _ in declared], op.name
        assert [role == "s" for role in op.roles] == [kind is float for _, kind in declared], op.name


@pytest.mark.parametrize("call, message", [
    (lambda: actnorm.actnorm_fwd(torch.randn(2, 3, 4), torch.zeros(3), torch.zeros(3), 3.0),
     r"actnorm_fwd: x must be \[B, C\] or \[B, C, H, W\] with B > 0, got shape \(2, 3, 4\)"),
    (lambda: actnorm.actnorm_fwd(torch.randn(2, 3), torch.zeros(4), torch.zeros(3), 3.0),
     r"actnorm_fwd: bias must have shape \[3\], got \[4\]"),
    (lambda: actnorm.actnorm_bwd(torch.randn(2, 3), torch.zeros(3), torch.randn(2, 3), torch.zeros(3),
                                 torch.zeros(3), 3.0), r"grad_log_det must have shape \[2\], got \[3\]"),
    (lambda: actnorm.actnorm_inv(torch.randn(2, 3), torch.zeros(3, dtype=torch.int64), torch.zeros(3), 3.0),
     r"actnorm_inv: bias must be a floating-point tensor, got torch.int64"),
    (lambda: prior.gaussian_log_prob_fwd(torch.randn(0, 3)), r"gaussian_log_prob_fwd: z must be \[B, ...\] with B > 0"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
