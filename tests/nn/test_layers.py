"""Data-dependent init, checkpoints, caches, dtypes, configs and bad input for the flow layers."""

import pickle

import pytest
import torch
from safetensors.torch import load, save

from flowkern.nn import (ActNorm, AdditiveCoupling, AffineCoupling, FlowLayer, FlowStep, Glow, InvConv1x1, Split,
                         Squeeze)
from tests.helpers import randomize_, random_input, rel_err


@pytest.mark.parametrize("image", [False, True], ids=["BC", "BCHW"])
def test_actnorm_ddi_gives_zero_mean_unit_variance(image):
    x = random_input(64, 7, image) * torch.linspace(0.5, 4.0, 7).view((1, -1) + (1,) * (2 + 2 * image - 2)) + 3.0
    actnorm = ActNorm(7)
    assert not bool(actnorm.initialized)
    y, _ = actnorm(x)
    per_channel = y.transpose(0, 1).reshape(7, -1).double()
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(7, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.var(1, unbiased=False), torch.ones(7, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert bool(actnorm.initialized)


def test_actnorm_ddi_runs_once_and_only_in_training():
    actnorm = ActNorm(4).eval()
    actnorm(random_input(8, 4, False))
    assert not bool(actnorm.initialized), "eval mode must not initialize"
    actnorm.train()
    actnorm(random_input(8, 4, False))
    bias = actnorm.bias.detach().clone()
    actnorm(random_input(8, 4, False) * 10)
    assert torch.equal(actnorm.bias, bias)


def test_actnorm_ddi_needs_two_values_per_channel():
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        ActNorm(4)(random_input(1, 4, False))


def test_actnorm_without_ddi_starts_as_identity():
    x = random_input(3, 4, False)
    y, log_det = ActNorm(4, ddi=False)(x)
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(3))


def _state_bytes(module):
    return save({k: v.contiguous() for k, v in module.state_dict().items()})


@pytest.mark.parametrize("coupling,mixing", [("additive", "reverse"), ("affine", "lu"), ("affine", "random")])
def test_state_dict_round_trip_is_exact_and_skips_ddi(coupling, mixing):
    torch.manual_seed(1)
    flow = Glow(12, levels=2, depth=2, hidden=8, coupling=coupling, mixing=mixing)
    flow(random_input(32, 12, False))  # DDI on the first training batch
    randomize_(flow)
    torch.manual_seed(2)  # a different random init that the checkpoint must fully overwrite
    restored = Glow(12, levels=2, depth=2, hidden=8, coupling=coupling, mixing=mixing)
    restored.load_state_dict(load(_state_bytes(flow)))
    x = random_input(5, 12, False)
    for mode in (False, True):
        flow.train(mode), restored.train(mode)
        z, log_det = flow(x)
        z2, log_det2 = restored(x)
        assert torch.equal(z, z2) and torch.equal(log_det, log_det2)
    assert all(torch.equal(a, b) for a, b in zip(flow.state_dict().values(), restored.state_dict().values())), \
        "a training forward after loading must not re-run data-dependent init"


def test_invconv_reads_its_factors_on_every_call_outside_frozen():
    conv = randomize_(InvConv1x1(6, "lu")).eval()
    x = random_input(4, 6, False)
    with torch.no_grad():
        y1, _ = conv(x)
        assert rel_err(conv.inverse(y1), x) < 1e-5
        conv.log_s.data.add_(0.5)  # a write no version counter sees
        y2, log_det = conv(x)
        with conv.frozen():
            assert torch.equal(conv(x)[0], y2)
            assert rel_err(conv.inverse(y2), x) < 1e-5     # through W^-1
            conv.log_s.data.add_(0.5)   # inside the block W and W^-1 are reused, as documented
            assert torch.equal(conv(x)[0], y2)
            assert rel_err(conv.inverse(y2), x) < 1e-5
        y3, _ = conv(x)
    fresh = conv.train()
    y_ref, log_det_ref = fresh(x)
    torch.testing.assert_close(y3, y_ref.detach())
    assert not torch.allclose(y1, y2) and not torch.allclose(y2, y3)
    conv.log_s.data.sub_(0.5)
    y_ref, log_det_ref = fresh(x)
    torch.testing.assert_close(y2, y_ref.detach())
    torch.testing.assert_close(log_det, log_det_ref.detach())


def test_invconv_eval_keeps_gradients_when_they_are_needed():
    conv = randomize_(InvConv1x1(6, "lu")).eval()
    y, log_det = conv(random_input(4, 6, False))
    (y.sum() + log_det.sum()).backward()
    assert conv.log_s.grad is not None and conv.lower.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_log_det_dtype_is_float32_or_float64(dtype):
    flow = randomize_(Glow(8, levels=2, depth=1, hidden=8, coupling="affine", mixing="lu"))
    if dtype == torch.float64:
        flow = flow.double()
    x = random_input(3, 8, False, dtype)
    z, log_det = flow(x)
    assert z.dtype == dtype and log_det.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    reference, reference_log_det = flow.double()(x.double())
    torch.testing.assert_close(log_det.double(), reference_log_det, rtol=1e-2 if dtype.itemsize == 2 else 1e-5,
                               atol=1e-2 if dtype.itemsize == 2 else 1e-5)


def test_from_config_accepts_original_keys_and_own_config():
    original = {"n_levels": 2, "depth": 3, "coupling_width": 16, "coupling": "affine", "permutation": False}
    flow = Glow.from_config(original, channels=24)
    assert flow.config == dict(channels=24, levels=2, depth=3, hidden=16, coupling="affine", mixing="lu",
                               image=False)
    assert Glow.from_config({"n_levels": 3, "depth": 3}, channels=8).config["mixing"] == "reverse"
    again = Glow.from_config(flow.config)
    assert again.config == flow.config
    with pytest.raises(ValueError, match="channels"):
        Glow.from_config(original)


BAD_INPUTS = {
    "wrong channels": (lambda: torch.randn(3, 7), "expected 8 channels"),
    "wrong ndim": (lambda: torch.randn(3, 8, 4), "expected shape"),
    "integer dtype": (lambda: torch.randint(0, 5, (3, 8)), "floating-point"),
    "NaN": (lambda: torch.randn(3, 8).index_fill_(1, torch.tensor([2]), float("nan")), "NaN or Inf"),
    "Inf": (lambda: torch.randn(3, 8).index_fill_(1, torch.tensor([5]), float("inf")), "NaN or Inf"),
    "empty batch": (lambda: torch.randn(0, 8), "empty batch"),
}
LAYERS = {
    "ActNorm": lambda: ActNorm(8), "InvConv1x1": lambda: InvConv1x1(8, "lu"),
    "AdditiveCoupling": lambda: AdditiveCoupling(8), "AffineCoupling": lambda: AffineCoupling(8),
    "Split": lambda: Split(8), "FlowStep": lambda: FlowStep(8), "Glow": lambda: Glow(8, levels=2, depth=1),
}


# Split.inverse takes the kept half only: test_split_inverse_checks covers it.
CALLS = [(layer, direction) for layer in sorted(LAYERS) for direction in ("forward", "inverse")
         if (layer, direction) != ("Split", "inverse")]


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
@pytest.mark.parametrize("layer,direction", CALLS)
def test_bad_input_raises_clear_value_error(layer, direction, bad):
    module = LAYERS[layer]()
    make, message = BAD_INPUTS[bad]
    call = module if direction == "forward" else module.inverse
    with pytest.raises(ValueError, match=message):
        call(make())


def test_split_inverse_checks():
    with pytest.raises(ValueError, match="expected 4 channels"):
        Split(8).inverse(torch.randn(3, 8))
    with pytest.raises(ValueError, match="factored\\): expected 4 channels"):
        Split(8).inverse(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="factored has shape"):
        Split(8).inverse(torch.randn(3, 4), torch.randn(3, 4, 2, 2))
    with pytest.raises(ValueError, match="factored\\): input contains NaN"):
        Split(8).inverse(torch.randn(3, 4), torch.full((3, 4), float("nan")))


def test_finite_check_can_be_disabled():
    import flowkern
    flowkern.set_finite_checks(False)
    y, _ = ActNorm(4, ddi=False)(torch.full((2, 4), float("nan")))
    assert torch.isnan(y).all()


def test_structural_errors():
    with pytest.raises(ValueError, match="height and width must be even"):
        Squeeze()(torch.randn(2, 3, 5, 4))
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels"):
        Glow(3, levels=2, depth=1, image=True)(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="image=True needs"):
        Glow(3, levels=2, depth=1, image=True)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="level 2 would have 1 channel"):
        Glow(4, levels=3)
    with pytest.raises(ValueError, match="at least 2 channels"):
        AdditiveCoupling(1)
    with pytest.raises(ValueError, match="mixing must be one of"):
        InvConv1x1(4, "shuffle")
    with pytest.raises(ValueError, match="coupling must be one of"):
        Glow(8, coupling="spline")


def test_subnet_with_wrong_output_shape_is_named():
    coupling = AffineCoupling(8, subnet=torch.nn.Linear(4, 4))  # affine needs 2 * 4 outputs
    with pytest.raises(ValueError, match="subnet returned shape \\(3, 4\\), expected \\(3, 8\\)"):
        coupling(torch.randn(3, 8))


def test_odd_channel_counts_split_unevenly():
    coupling = randomize_(AffineCoupling(7, hidden=4)).double()
    x = random_input(3, 7, False, torch.float64)
    y, _ = coupling(x)
    assert torch.equal(y[:, :4], x[:, :4]), "the first half(7) = 4 channels condition the other 3"
    assert rel_err(coupling.inverse(y), x) < 1e-12


def test_modules_pickle():
    flow = Glow(8, levels=2, depth=1, coupling="affine", mixing="lu")
    flow(random_input(16, 8, False))
    randomize_(flow)   # zero-initialized output layers would make every coupling the identity
    restored = pickle.loads(pickle.dumps(flow))
    x = random_input(3, 8, False)
    z, log_det = flow.eval()(x)
    assert rel_err(z, x) > 1e-2, "the flow must not be close to the identity for this check to mean anything"
    restored_z, restored_log_det = restored.eval()(x)
    assert torch.equal(restored_z, z) and torch.equal(restored_log_det, log_det)


def test_inverse_in_training_mode_never_runs_ddi():
    flow = Glow(8, levels=2, depth=2, coupling="affine", mixing="lu")
    flow.inverse(random_input(4, 8, False) * 5)
    assert not any(bool(m.initialized) for m in flow.modules() if isinstance(m, ActNorm))
    flow(random_input(16, 8, False))
    assert all(bool(m.initialized) for m in flow.modules() if isinstance(m, ActNorm))


@pytest.mark.parametrize("layer", sorted(set(LAYERS) - {"Split"}))  # Split has no parameters
def test_device_mismatch_is_named(layer):
    with pytest.raises(ValueError, match="input is on meta but the layer's parameters are on cpu"):
        LAYERS[layer]()(torch.empty(3, 8, device="meta"))


def test_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys \\['level'\\]"):
        Glow.from_config({"channels": 8, "level": 2})


def test_permutation_mixing_has_no_lu_weight():
    with pytest.raises(ValueError, match="fixed permutation"):
        InvConv1x1(6, "reverse").weight()


def test_every_flow_layer_follows_the_contract():
    """Every flow layer of flowkern.nn is a FlowLayer (one input check, forward -> (y, log_det), inverse), and a
    user's subclass gets the same checks by implementing only the maths."""
    import flowkern.nn

    layers = [getattr(flowkern.nn, name) for name in ("ActNorm", "InvConv1x1", "AdditiveCoupling", "AffineCoupling",
                                                     "Split", "Squeeze", "FlowStep", "Glow")]
    assert all(issubclass(layer, FlowLayer) for layer in layers)

    class Shift(FlowLayer):
        def __init__(self, channels):
            super().__init__()
            self.channels = channels
            self.shift = torch.nn.Parameter(torch.ones(channels))

        def _forward(self, x):
            return x + self.shift, torch.zeros(x.shape[0])

        def _inverse(self, y):
            return y - self.shift

    layer = Shift(8)
    for bad, (make, message) in BAD_INPUTS.items():
        for call, where in ((layer, "Shift"), (layer.inverse, "Shift.inverse")):
            with pytest.raises(ValueError, match=f"^{where}: .*{message}"):
                call(make())
    with pytest.raises(ValueError, match="input is on meta but the layer's parameters are on cpu"):
        layer(torch.empty(3, 8, device="meta"))
    x = torch.randn(3, 8)
    y, log_det = layer(x)
    torch.testing.assert_close(layer.inverse(y), x)
    assert log_det.shape == (3,)
