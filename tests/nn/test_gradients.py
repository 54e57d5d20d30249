"""gradcheck in float64 of every layer w.r.t. its input and all its parameters, on every backend.

Every layer's forward on [B, C] is checked in full (the whole Jacobian, element by element) on the kernel backends,
and every single layer's on the torch reference too. The image path, the composite layers on the torch reference
(built from the single layers' ops, each checked in full) and the composites' inverses, which cost minutes in full,
use gradcheck's fast mode: it compares v^T J u for random u, v between the analytical and numerical Jacobians,
which a wrong gradient entry fails unless it happens to be orthogonal to the random projections."""
import pytest
import torch
from torch.func import functional_call

import flowkern

from flowkern.nn import ActNorm, AdditiveCoupling, AffineCoupling, FlowStep, Glow, InvConv1x1, Split
from tests.conftest import GPU_KERNEL_BACKENDS, KERNEL_BACKENDS
from tests.helpers import backends_for_invariants, randomize_, random_input

# The Triton interpreter would take minutes per gradcheck; its kernels' gradients are checked against the float64
# reference in tests/ops, and here on a GPU.
BACKENDS, _ = backends_for_invariants()

LAYERS = {
    "actnorm": lambda image: ActNorm(5),
    "invconv-lu": lambda image: InvConv1x1(5, "lu"),
    "invconv-random": lambda image: InvConv1x1(5, "random"),
    "additive": lambda image: AdditiveCoupling(5, hidden=4, image=image),
    "affine": lambda image: AffineCoupling(5, hidden=4, image=image),
    "flowstep": lambda image: FlowStep(5, 4, "affine", "lu", image=image),
    "glow": lambda image: Glow(5, levels=2, depth=1, hidden=4, coupling="affine", mixing="lu"),
}
COMPOSITES = ("flowstep", "glow")


class _Inverse(torch.nn.Module):
    """Makes module.inverse the forward, so functional_call can swap its parameters."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, y):
        return self.module.inverse(y)


def _gradcheck_with_params(module, x, fast_mode=False):
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def fn(x, *params):
        return functional_call(module, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params), eps=1e-6, atol=1e-7, fast_mode=fast_mode)


@pytest.mark.parametrize("image", [False, True], ids=["BC", "BCHW"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_gradcheck(backend, layer, image):
    module = randomize_(LAYERS[layer](image)).double()
    with flowkern.use_backend(backend):
        _gradcheck_with_params(module, random_input(3, 5, image, torch.float64, hw=(2, 2)),
                               fast_mode=image or (backend == "torch" and layer in COMPOSITES))


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_gradcheck(backend, layer):
    module = randomize_(LAYERS[layer](False)).double()
    with flowkern.use_backend(backend):
        _gradcheck_with_params(_Inverse(module), random_input(3, 5, False, torch.float64),
                               fast_mode=layer in COMPOSITES)


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["flowstep", "glow"])
@pytest.mark.parametrize("backend", GPU_KERNEL_BACKENDS)
def test_gpu_forward_and_inverse_gradcheck(backend, layer):
    module = randomize_(LAYERS[layer](False)).double().cuda()
    with flowkern.use_backend(backend):
        _gradcheck_with_params(module, random_input(3, 5, False, torch.float64).cuda())
        _gradcheck_with_params(_Inverse(module), random_input(3, 5, False, torch.float64).cuda())


def test_split_gradcheck():
    split = Split(5)
    x = random_input(3, 5, False, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: split(x), (x,))
