"""flowkern.ops.spec: every op is declared once, and the compiled ops agree with the declarations (same arguments,
same outputs), so one fake per op serves both `flowkern::<op>` and `flowkern_C::<op>`."""
from __future__ import annotations

import pytest
import torch

import flowkern
import flowkern.ops  # noqa: F401  (declares every op)
from flowkern.nn import Glow
from flowkern.ops.spec import SPECS, MlpParams, OpSpec

needs_extension = pytest.mark.skipif("cpp" not in flowkern.backends(), reason="flowkern._C is not built here")


@needs_extension
def test_every_compiled_op_is_declared_with_its_schema():
    compiled = {name for name in dir(torch.ops.flowkern_C) if not name.startswith("_")
                and isinstance(getattr(torch.ops.flowkern_C, name), torch._ops.OpOverloadPacket)}
    assert compiled == set(SPECS)
    for name, spec in SPECS.items():
        assert str(getattr(torch.ops.flowkern_C, name).default._schema) == f"flowkern_C::{name}{spec.schema()}"


def test_custom_op_adds_the_backend_argument():
    for name, spec in SPECS.items():
        assert str(getattr(torch.ops.flowkern, name).default._schema) == f"flowkern::{name}{spec.schema(True)}"


def test_groups_are_one_tensor_list_argument():
    spec = SPECS["mlp_coupling_fwd"]
    assert dict(spec.args)["mlp"] is MlpParams
    assert "Tensor[] mlp" in spec.schema()



def test_saved_activations_get_no_gradient_and_results_get_zeros():
    # The fused Glow's forward returns (z, log_det, log_prior, mid, inp); log_prob uses neither z nor the saved
    # activations, so the backward gets None for mid and inp and a zero gradient for z.
    spec = SPECS["glow_fwd"]
    assert spec.activations == 2
    seen = {}
    original = spec.backward

    def spy(args, *grads):
        seen["grads"] = grads
        return original(args, *grads)

    flow = Glow(6, levels=1, depth=1, hidden=4).eval()
    x = torch.randn(3, 6)
    spec.backward = spy
    try:
        with flowkern.use_backend("cpp" if "cpp" in flowkern.backends() else "torch"):
            if flow.path_for(x) != "fused":
                pytest.skip("no fused Glow backend here")
            flow.log_prob(x).sum().backward()
    finally:
        spec.backward = original
    grad_z, grad_log_det, grad_log_prior, grad_mid, grad_inp = seen["grads"]
    assert grad_mid is None and grad_inp is None
    assert torch.equal(grad_z, torch.zeros_like(grad_z)) and grad_log_det is not None


def test_saved_activations_need_a_backward_function():
    with pytest.raises(ValueError, match="saved activations need a backward function"):
        OpSpec("never_registered", "glow", (("x", torch.Tensor),), lambda x: x, "Tensor",
               differentiable=("x",), backward=SPECS["glow_bwd"], activations=1)
