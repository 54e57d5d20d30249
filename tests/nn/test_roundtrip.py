"""x -> (z, log_det) -> x for every layer and for Glow; float32 <= 1e-5, float64 <= 1e-10 relative error."""
import contextlib

import pytest
import torch

import flowkern
from flowkern.nn import (ActNorm, AdditiveCoupling, AffineCoupling, FlowStep, Glow, InvConv1x1, Split,
                         Squeeze)
from tests.helpers import backends_for_invariants, randomize_, random_input, rel_err
from tests.pairwise import pairwise_parametrize

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
BACKENDS, INTERPRETED = backends_for_invariants()

LAYERS = {
    "actnorm": lambda c, image: ActNorm(c),
    "invconv-lu": lambda c, image: InvConv1x1(c, "lu"),
    "invconv-reverse": lambda c, image: InvConv1x1(c, "reverse"),
    "invconv-random": lambda c, image: InvConv1x1(c, "random"),
    "additive": lambda c, image: AdditiveCoupling(c, hidden=16, image=image),
    "affine": lambda c, image: AffineCoupling(c, hidden=16, image=image),
    "flowstep-affine-lu": lambda c, image: FlowStep(c, 16, "affine", "lu", image=image),
    "flowstep-additive-reverse": lambda c, image: FlowStep(c, 16, "additive", "reverse", image=image),
}


def _build(make, channels, image, dtype):
    return randomize_(make(channels, image)).to(dtype)


@pairwise_parametrize(mode=["train", "eval"], layer=sorted(LAYERS), size=[(6, 1), (10, 3), (770, 129)],
                      image=[False, True], dtype=[torch.float32, torch.float64])
def test_layer_round_trip(mode, layer, size, image, dtype):
    channels, batch = size
    if image and channels == 770:
        batch = 3  # keep the [B, 770, H, W] case small; the 770-channel math is the same as [B, C]
    module = _build(LAYERS[layer], channels, image, dtype).train(mode == "train")
    x = random_input(batch, channels, image, dtype)
    y, log_det = module(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert log_det.shape == (batch,) and log_det.dtype == dtype
    assert rel_err(module.inverse(y), x) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels", [6, 10, 770])
def test_split_round_trip(channels, dtype):
    split = Split(channels)
    x = random_input(3, channels, False, dtype)
    kept, log_p, factored = split(x, return_factored=True)
    assert kept.shape[1] == (channels + 1) // 2 and factored.shape[1] == channels // 2
    assert torch.equal(split.inverse(kept, factored), x)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(factored.double()).sum(1)
    assert rel_err(log_p, expected) <= TOLERANCE[dtype]


def test_split_inverse_samples_factored_channels():
    split = Split(10)
    x = split.inverse(torch.randn(4, 5), temperature=0.0)
    assert x.shape == (4, 10) and torch.equal(x[:, 5:], torch.zeros(4, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_squeeze_round_trip(dtype):
    x = random_input(3, 6, True, dtype, hw=(4, 6))
    y, log_det = Squeeze()(x)
    assert y.shape == (3, 24, 2, 3) and torch.equal(log_det, torch.zeros(3, dtype=dtype))
    assert torch.equal(Squeeze().inverse(y), x)
    # Glow's space-to-depth order: channel c's 2x2 block occupies output channels 4c .. 4c + 3.
    assert torch.equal(y[:, 4:8, 0, 0].reshape(3, 2, 2), x[:, 1, :2, :2])
    vector = torch.randn(3, 6, dtype=dtype)
    assert torch.equal(Squeeze()(vector)[0], vector)


# (channels, batch, image) by name
GLOW_CASES = {f"C{c}-B{b}-{'img' if i else 'vec'}": (c, b, i)
              for c, b, i in [(6, 1, False), (10, 3, False), (770, 129, False), (6, 2, True), (10, 3, True)]}


@pairwise_parametrize(backend=BACKENDS, case=GLOW_CASES, coupling=["additive", "affine"],
                      mixing=["lu", "reverse", "random"], dtype=[torch.float32, torch.float64])
def test_glow_round_trip(backend, case, coupling, mixing, dtype):
    channels, batch, image = GLOW_CASES[case]
    with flowkern.use_backend(backend):
        _check_glow_round_trip(channels, batch, image, coupling, mixing, dtype)


@pytest.mark.parametrize("coupling, mixing", [("additive", "reverse"), ("affine", "lu")])
@pytest.mark.parametrize("backend", INTERPRETED)
def test_glow_round_trip_interpreted(backend, coupling, mixing):
    with flowkern.use_backend(backend):
        _check_glow_round_trip(10, 3, False, coupling, mixing, torch.float32)


def _check_glow_round_trip(channels, batch, image, coupling, mixing, dtype):
    # float32 round-trip error grows with the product of the steps' cond(W): milder noise than the single-layer
    # tests keeps each LU weight's condition number moderate while every layer is still far from the identity.
    flow = randomize_(Glow(channels, levels=3 if not image else 2, depth=2, hidden=16, coupling=coupling,
                           mixing=mixing, image=image), scale=0.05).to(dtype)
    x = random_input(batch, channels, image, dtype, hw=(4, 8))
    # Train and eval: triangular solves; inside frozen(): the LU layers' reused inverse weights (the fused path's
    # packed inverse).
    for mode, frozen in ((True, False), (False, False), (False, True)):
        flow.train(mode)
        with flow.frozen() if frozen else contextlib.nullcontext(), torch.set_grad_enabled(not frozen):
            z, log_det = flow(x)
            assert z.shape == x.shape and log_det.shape == (batch,) and log_det.dtype == dtype
            assert rel_err(flow.inverse(z), x) <= TOLERANCE[dtype]


def test_glow_pixelwise_on_images_without_squeeze():
    flow = randomize_(Glow(6, levels=2, depth=1, hidden=8, coupling="affine", mixing="lu")).double()
    x = random_input(2, 6, True, torch.float64, hw=(3, 5))
    z, _ = flow(x)
    assert rel_err(flow.inverse(z), x) <= 1e-10
