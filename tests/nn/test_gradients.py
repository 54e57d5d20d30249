"""gradcheck in float64 of every layer w.r.t. its input and all its parameters."""
import pytest
import torch
from torch.func import functional_call

from flowkern.nn import ActNorm, AdditiveCoupling, AffineCoupling, FlowStep, Glow, InvConv1x1, Split
from tests.helpers import randomize_, random_input

LAYERS = {
    "actnorm": lambda image: ActNorm(5),
    "invconv-lu": lambda image: InvConv1x1(5, "lu"),
    "invconv-random": lambda image: InvConv1x1(5, "random"),
    "additive": lambda image: AdditiveCoupling(5, hidden=4, image=image),
    "affine": lambda image: AffineCoupling(5, hidden=4, image=image),
    "flowstep": lambda image: FlowStep(5, 4, "affine", "lu", image=image),
    "glow": lambda image: Glow(5, levels=2, depth=1, hidden=4, coupling="affine", mixing="lu"),
}


class _Inverse(torch.nn.Module):
    """Makes module.inverse the forward, so functional_call can swap its parameters."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, y):
        return self.module.inverse(y)


def _gradcheck_with_params(module, x):
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def fn(x, *params):
        return functional_call(module, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("image", [False, True], ids=["BC", "BCHW"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_forward_gradcheck(layer, image):
    module = randomize_(LAYERS[layer](image)).double()
    _gradcheck_with_params(module, random_input(3, 5, image, torch.float64, hw=(2, 2)))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_inverse_gradcheck(layer):
    module = randomize_(LAYERS[layer](False)).double()
    _gradcheck_with_params(_Inverse(module), random_input(3, 5, False, torch.float64))


def test_split_gradcheck():
    split = Split(5)
    x = random_input(3, 5, False, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: split(x), (x,))
