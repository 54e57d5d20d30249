"""log_det equals log |det J| of the autograd Jacobian (float64, randomized parameters), on every backend."""
import pytest
import torch

import flowkern

from flowkern.nn import (ActNorm, AdditiveCoupling, AffineCoupling, FlowStep, Glow, InvConv1x1, MLPSubnet,
                         Squeeze)
from tests.helpers import backends_for_invariants, randomize_, random_input
from tests.pairwise import pairwise_parametrize

BACKENDS, INTERPRETED = backends_for_invariants()

LAYERS = {
    "actnorm": lambda c, image: ActNorm(c),
    "invconv-lu": lambda c, image: InvConv1x1(c, "lu"),
    "invconv-reverse": lambda c, image: InvConv1x1(c, "reverse"),
    "invconv-random": lambda c, image: InvConv1x1(c, "random"),
    "additive": lambda c, image: AdditiveCoupling(c, hidden=8, image=image),
    "affine": lambda c, image: AffineCoupling(c, hidden=8, image=image),
    "affine-custom-subnet": lambda c, image: AffineCoupling(c, subnet=MLPSubnet(c - c // 2, 2 * (c // 2), 4)),
    "flowstep": lambda c, image: FlowStep(c, 8, "affine", "lu", image=image),
}


def jacobian_log_det(fn, x: torch.Tensor) -> torch.Tensor:
    """log |det d fn(x_b) / d x_b| for each sample b, by building the full Jacobian."""
    dets = []
    for b in range(x.shape[0]):
        sample = x[b:b + 1]
        jac = torch.autograd.functional.jacobian(lambda s: fn(s).reshape(-1), sample).reshape(sample.numel(), -1)
        dets.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(dets)


@pairwise_parametrize(backend=BACKENDS, layer=sorted(LAYERS), channels=[6, 7], image=[False, True])
def test_layer_log_det_matches_jacobian(backend, layer, channels, image):
    module = randomize_(LAYERS[layer](channels, image)).double()
    x = random_input(3, channels, image, torch.float64, hw=(2, 4))
    with flowkern.use_backend(backend):
        _, log_det = module(x)
        torch.testing.assert_close(log_det, jacobian_log_det(lambda s: module(s)[0], x), rtol=1e-9, atol=1e-9)


@pairwise_parametrize(backend=BACKENDS, image=[False, True], coupling=["additive", "affine"],
                      mixing=["lu", "reverse", "random"])
def test_glow_log_det_matches_jacobian(backend, image, coupling, mixing):
    _check_glow_log_det(backend, coupling, mixing, image)


@pytest.mark.parametrize("coupling, mixing", [("additive", "reverse"), ("affine", "lu")])
@pytest.mark.parametrize("backend", INTERPRETED)
def test_glow_log_det_matches_jacobian_interpreted(backend, coupling, mixing):
    _check_glow_log_det(backend, coupling, mixing, image=False)


def _check_glow_log_det(backend: str, coupling: str, mixing: str, image: bool) -> None:
    flow = randomize_(Glow(3 if image else 10, levels=2, depth=2, hidden=8, coupling=coupling, mixing=mixing,
                           image=image)).double()
    x = random_input(2, flow.channels, image, torch.float64, hw=(4, 4))
    with flowkern.use_backend(backend):
        _, log_det = flow(x)
        torch.testing.assert_close(log_det, jacobian_log_det(lambda s: flow(s)[0], x), rtol=1e-9, atol=1e-9)


def test_squeeze_log_det_matches_jacobian():
    x = random_input(2, 3, True, torch.float64, hw=(2, 4))
    _, log_det = Squeeze()(x)
    torch.testing.assert_close(log_det, jacobian_log_det(lambda s: Squeeze()(s)[0], x))


def test_glow_log_prob_is_prior_plus_log_det():
    flow = randomize_(Glow(10, levels=3, depth=1, hidden=8, coupling="affine", mixing="lu")).double()
    x = random_input(4, 10, False, torch.float64)
    z, log_det = flow(x)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(flow.log_prob(x), prior + log_det)
