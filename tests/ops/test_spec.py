"""flowkern.ops.spec: every op is declared once, and the compiled ops agree with the declarations (same arguments,
same outputs), so one fake per op serves both `flowkern::<op>` and `flowkern_C::<op>`."""
from __future__ import annotations

import pytest
import torch

import flowkern
import flowkern.ops  # noqa: F401  (declares every op)
from flowkern.ops.spec import SPECS, MlpParams

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

