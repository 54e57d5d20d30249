"""nn.Glow's choice of path (reference / per-op / fused) and how the fused path follows the module tree, on the
backends with a whole-Glow kernel. The fused op itself is tested in tests/ops/test_glow.py."""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern import ops
from flowkern.nn import ActNorm, AffineCoupling, Glow, MLPSubnet
from tests.conftest import KERNEL_BACKENDS
from tests.helpers import random_glow, randomize_
from tests.ops.kernel_cases import device_for, make
from tests.ops.kernel_checks import LauncherCalls

# Kernel backends with a whole-Glow kernel here: Triton (GPU, or the interpreter) and the compiled CPU kernel.
GLOW_BACKENDS = [b for b in KERNEL_BACKENDS if b in ("triton", "cpp")]
each_backend = pytest.mark.parametrize("impl", GLOW_BACKENDS)
LAUNCHER_MODULES = {"triton": "flowkern.kernels.triton.glow", "cpp": "flowkern.kernels.compiled"}
LAUNCHERS = ("glow_fwd", "glow_inv", "glow_bwd")


@each_backend
def test_path_for(impl):
    device = device_for(impl)
    x = make((8, 10), device=device)
    flow = Glow(10, levels=2, depth=2, hidden=16).to(device)
    with flowkern.use_backend("torch"):
        assert flow.path_for(x) == "reference"
    flowkern.set_backend(impl)
    assert flow.path_for(x) == "ops"        # training mode, ActNorm data-dependent init pending
    flow.eval()
    assert flow.path_for(x) == "fused"      # eval mode never runs the init
    flow.train()
    flow(x)                                 # the init call
    assert flow.path_for(x) == "fused"
    assert flow.path_for(x.view(8, 10, 1, 1)) == "ops"
    for other in (Glow(10, levels=1, depth=1, hidden=128),                  # hidden too wide for registers
                  Glow(8, levels=1, depth=1, hidden=16, image=True)):       # image flows
        for m in other.modules():
            if isinstance(m, ActNorm):
                m.initialized.fill_(True)
        assert other.to(device).path_for(make((8, other.channels, 4, 4) if other.image else (8, 10),
                                                device=device)) == "ops"
    flow.fuse = False                       # the per-op path on request
    assert flow.path_for(x) == "ops"
    user = Glow(10, levels=1, depth=1, hidden=16).to(device).eval()
    user.levels[0][0].coupling = AffineCoupling(10, subnet=MLPSubnet(5, 10, 16)).to(device)
    assert user.path_for(x) == "ops"


@each_backend
def test_fused_path_follows_replaced_modules_and_parameters(impl):
    # The fused path reads the module tree once and re-reads it when anything on it was replaced.
    device = device_for(impl)
    x = make((8, 10), device=device)
    flow = random_glow(10, 2, "additive", "reverse", device).eval()
    with flowkern.use_backend(impl):
        flow.log_prob(x)
        net = flow.levels[1][0].coupling.subnet
        net.out.weight = torch.nn.Parameter(torch.randn_like(net.out.weight))
        flow.levels[0][1].actnorm = randomize_(ActNorm(10).to(device))
        assert flow.path_for(x) == "fused"
        fused = flow.log_prob(x)
    with flowkern.use_backend("torch"):
        expected = flow.log_prob(x)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    flow.levels[0][0].coupling = AffineCoupling(10, subnet=MLPSubnet(5, 10, 16)).to(device)
    with flowkern.use_backend(impl):
        assert flow.path_for(x) == "ops"


@each_backend
def test_first_training_call_initializes_unfused_then_fuses(impl, monkeypatch):
    calls = LauncherCalls(monkeypatch, LAUNCHER_MODULES[impl], LAUNCHERS)
    device = device_for(impl)
    flow = Glow(10, levels=2, depth=2, hidden=16, coupling="affine").to(device)
    x = 1.0 + 2.0 * make((33, 10), device=device)
    flowkern.set_backend(impl)
    flow.log_prob(x)
    assert calls.counts["glow_fwd"] == 0
    z, _ = flow(x)
    (flow.log_prob(x).mean()).backward()
    with torch.no_grad():
        flow.inverse(z)
    assert calls.counts == {"glow_fwd": 2, "glow_inv": 1, "glow_bwd": 1}
    # The init on the first batch standardized it: the first level's ActNorm output has zero mean.
    normed, _ = ops.actnorm(x, flow.levels[0][0].actnorm.bias, flow.levels[0][0].actnorm.logs, 3.0)
    assert normed.mean(0).abs().max() < 1e-4


@each_backend
def test_inverse_with_gradients_takes_the_layer_path(impl, monkeypatch):
    calls = LauncherCalls(monkeypatch, LAUNCHER_MODULES[impl], LAUNCHERS)
    device = device_for(impl)
    flow = random_glow(10, 2, "additive", "reverse", device)
    z = make((5, 10), device=device).requires_grad_()
    flowkern.set_backend(impl)
    flow.inverse(z).sum().backward()
    assert calls.counts["glow_inv"] == 0 and z.grad is not None


@each_backend
def test_checkpoint_with_other_permutations_rebuilds_the_plan(impl):
    device = device_for(impl)
    flow = random_glow(10, 2, "additive", "random", device).eval()
    other = random_glow(10, 2, "additive", "random", device).eval()
    x = make((5, 10), device=device)
    flowkern.set_backend(impl)
    flow(x)
    flow.load_state_dict(other.state_dict())
    with torch.no_grad():
        z, _ = flow(x)
        expected, _ = other(x)
    torch.testing.assert_close(z, expected)
