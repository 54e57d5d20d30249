"""nn.Glow answers from its parameters as they are now, whatever wrote them, on every backend and path (fused and
per-op, LU weights included); only inside `frozen()` does it reuse a packing, and there only as documented."""
from __future__ import annotations

import copy

import pytest
import torch

import flowkern
from flowkern.nn import Glow
from tests.conftest import KERNEL_BACKENDS
from tests.helpers import randomize_
from tests.pairwise import pairwise_parametrize

BACKENDS = ["torch"] + [b for b in KERNEL_BACKENDS if b in ("triton", "cpp")]
FLOWS = [("affine", "lu"), ("additive", "reverse")]


def _bump_data(flow):
    for p in flow.parameters():
        p.data.add_(0.1)


def _in_place_no_grad(flow):
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(0.9).add_(0.05)


def _replace_data(flow):
    for p in flow.parameters():
        p.data = p.data * 0.9 + 0.05


def _load_state_dict(flow):
    other = randomize_(copy.deepcopy(flow), scale=0.2)
    flow.load_state_dict(other.state_dict())


def _optimizer_step(flow):
    optimizer = torch.optim.SGD(flow.parameters(), lr=0.05)
    flow.train()
    loss = -flow.log_prob(torch.randn(8, flow.channels)).mean()
    loss.backward()
    optimizer.step()
    flow.eval()


WRITERS = {"data": _bump_data, "in_place_no_grad": _in_place_no_grad, "replaced_data": _replace_data,
           "load_state_dict": _load_state_dict, "optimizer": _optimizer_step}


def _initialized_flow(coupling: str, mixing: str) -> Glow:
    flow = randomize_(Glow(16, levels=2, depth=2, hidden=8, coupling=coupling, mixing=mixing), scale=0.05)
    flow(torch.randn(32, 16))   # ActNorm's data-dependent init
    return flow.eval()


def _rebuilt(flow: Glow, x: torch.Tensor):
    """(z, log_det, inverse(z)) of a new flow loaded from `flow`'s state, on the torch reference: nothing in it can
    predate the parameters' current values."""
    fresh = Glow(flow.channels, **{k: v for k, v in flow.config.items() if k != "channels"})
    fresh.load_state_dict(flow.state_dict())
    with flowkern.use_backend("torch"), torch.no_grad():
        z, log_det = fresh.eval()(x)
        return z, log_det, fresh.inverse(z)


def _per_op(flow: Glow, x: torch.Tensor):
    flow.fuse = False
    try:
        z, log_det = flow(x)
        return z, log_det, flow.inverse(z)
    finally:
        flow.fuse = True


@pairwise_parametrize(writer=sorted(WRITERS), flow=FLOWS, backend=BACKENDS)
def test_every_call_reads_the_parameters_as_they_are_now(writer, flow, backend):
    flow = _initialized_flow(*flow)
    x = torch.randn(21, 16)
    with flowkern.use_backend(backend), torch.no_grad():
        expected_path = "reference" if backend == "torch" else "fused"
        assert flow.path_for(x) == expected_path
        before, _ = flow(x)
        flow.inverse(before)
    with flowkern.use_backend(backend):
        WRITERS[writer](flow)
    with flowkern.use_backend(backend), torch.no_grad():
        z, log_det = flow(x)
        restored = flow.inverse(z)
        log_prob = flow.log_prob(x)
        per_op = _per_op(flow, x)
    assert (z - before).abs().max() > 1e-3, "the write did not change the flow: the test would prove nothing"
    z_new, log_det_new, restored_new = _rebuilt(flow, x)
    for actual in ((z, log_det, restored), per_op):
        for a, e in zip(actual, (z_new, log_det_new, restored_new)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(log_prob, flowkern.ops.gaussian_log_prob(z_new) + log_det_new, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_reuses_the_packing_until_the_block_ends(backend):
    flow = _initialized_flow("affine", "lu")
    x = torch.randn(21, 16)
    with flowkern.use_backend(backend), torch.no_grad():
        fresh, _ = flow(x)
        with flow.frozen():
            assert torch.equal(flow(x)[0], fresh)
            _bump_data(flow)
            inside, _ = flow(x)
            _load_state_dict(flow)      # a checkpoint loaded inside the block is seen at once
            loaded, _ = flow(x)
            loaded_ops, _, _ = _per_op(flow, x)
        after, _ = flow(x)
    expected, _, _ = _rebuilt(flow, x)
    if backend == "torch":   # the reference path packs nothing: always fresh
        assert (inside - fresh).abs().max() > 1e-3
    else:
        assert torch.equal(inside, fresh)
    for actual in (loaded, loaded_ops, after):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_frozen_blocks_nest_and_gradients_stay_live():
    flow = _initialized_flow("affine", "lu")
    x = torch.randn(21, 16)
    with flow.frozen(), torch.no_grad():
        outer, _ = flow(x)
        with flow.frozen():
            assert torch.equal(flow(x)[0], outer)
        _bump_data(flow)
        assert torch.equal(flow(x)[0], outer)   # the inner block's end does not end the outer one
    with flow.frozen():
        flow.train()
        loss = -flow.log_prob(torch.randn(8, 16)).mean()
        loss.backward()     # a call that needs gradients packs live tensors, never the frozen copy
    assert all(p.grad is not None for p in flow.parameters())
