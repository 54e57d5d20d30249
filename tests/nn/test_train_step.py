"""flowkern.TrainStep: the same parameters as a plain training loop, loss kinds, non-finite detection, and (on a
GPU) CUDA-graph replays with no host syncs."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import flowkern
from flowkern import TrainStep
from flowkern.nn import Glow

needs_triton = pytest.mark.skipif("triton" not in flowkern.backends(), reason="needs the triton backend")


def _data(rows: int, channels: int, device) -> torch.Tensor:
    return (torch.randn(rows, channels, dtype=torch.float64) * torch.linspace(0.5, 2.0, channels) + 0.7).float().to(
        device)


def _plain_loop(flow, batches, clip_norm, lr=1e-2):
    optimizer = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=0.01, eps=1e-6)
    losses = []
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = -flow.log_prob(x).mean()
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(flow.parameters(), clip_norm)
        optimizer.step()
        losses.append(loss.detach())
    return losses, optimizer


def _train_step_loop(flow, batches, clip_norm, lr=1e-2, **kwargs):
    optimizer = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=0.01, eps=1e-6)
    step = TrainStep(flow, optimizer, clip_norm=clip_norm, **kwargs)
    losses = [step(x) for x in batches]
    return step.read(losses), optimizer


def _assert_same_training(flow, batches, clip_norm, backend, rtol=1e-5, **kwargs):
    plain, trained = flow, copy.deepcopy(flow)
    with flowkern.use_backend(backend):
        expected_losses, expected_opt = _plain_loop(plain, batches, clip_norm)
        losses, opt = _train_step_loop(trained, batches, clip_norm, **kwargs)
    torch.testing.assert_close(torch.tensor(losses), torch.stack(expected_losses).cpu(), rtol=rtol, atol=rtol)
    for (name, p), q in zip(plain.named_parameters(), trained.parameters()):
        torch.testing.assert_close(q, p, rtol=rtol, atol=rtol, msg=name)
    for p, q in zip(plain.parameters(), trained.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[q][key], expected_opt.state[p][key], rtol=rtol, atol=1e-7)
        assert float(opt.state[q]["step"]) == float(expected_opt.state[p]["step"]) == len(batches)


def _batches(device, channels=10, rows=150, batch=16):
    # 150 rows in batches of 16: 9 full batches and a last one of 6.
    return list(_data(rows, channels, device).split(batch))


@pytest.mark.parametrize("clip_norm", [1.0, None])
@pytest.mark.parametrize("coupling, mixing", [("additive", "reverse"), ("affine", "lu")])
def test_matches_plain_loop_on_the_torch_backend(coupling, mixing, clip_norm):
    flow = Glow(10, levels=2, depth=2, hidden=16, coupling=coupling, mixing=mixing)
    _assert_same_training(flow, _batches("cpu"), clip_norm, "torch")


@needs_triton
@pytest.mark.parametrize("coupling, mixing", [("additive", "reverse"), ("affine", "lu")])
def test_matches_plain_loop_on_the_fused_path(coupling, mixing):
    flow = Glow(10, levels=2, depth=2, hidden=16, coupling=coupling, mixing=mixing)
    batches = _batches("cpu")[:4] + _batches("cpu")[-1:]  # interpreted kernels are slow: 5 steps, the last short
    _assert_same_training(flow, batches, 1.0, "triton")


def test_bits_per_dim_is_nll_over_ln2_and_dims():
    flow = Glow(10, levels=2, depth=2, hidden=16)
    x = _data(32, 10, "cpu")
    reference = copy.deepcopy(flow)
    reference.train()
    nll = -reference.log_prob(x).mean()
    step = TrainStep(flow, torch.optim.AdamW(flow.parameters()), loss="bits_per_dim")
    torch.testing.assert_close(step(x), nll.detach() / (math.log(2.0) * 10))


def test_non_finite_input_raises_with_the_step_number():
    flow = Glow(10, levels=2, depth=2, hidden=16)
    step = TrainStep(flow, torch.optim.AdamW(flow.parameters()))
    batches = _batches("cpu")
    step(batches[0])
    step(batches[1])
    bad = batches[2].clone()
    bad[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="at step 3 "):
        step(bad)


def test_bad_arguments_are_named():
    flow = Glow(10, levels=1, depth=1, hidden=16)
    optimizer = torch.optim.AdamW(flow.parameters())
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainStep(flow, optimizer, loss="mse")
    with pytest.raises(ValueError, match="clip_norm"):
        TrainStep(flow, optimizer, clip_norm=0.0)
    with pytest.raises(ValueError, match="CUDA graphs need the flow on a GPU"):
        TrainStep(flow, optimizer, graphs=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        TrainStep(flow, optimizer)([[1.0] * 10])


# ---- CUDA graphs ----

@pytest.mark.gpu
@pytest.mark.parametrize("coupling, mixing", [("additive", "reverse"), ("affine", "lu")])
def test_gpu_graph_replays_match_plain_loop(coupling, mixing):
    flow = Glow(384, levels=3, depth=3, hidden=32, coupling=coupling, mixing=mixing).cuda()
    # 13 batches: two eager (first two of the shape), captured, then replays; the short last batch runs eagerly.
    batches = _batches("cuda", channels=384, rows=64 * 12 + 20, batch=64)
    _assert_same_training(flow, batches, 1.0, "auto", rtol=1e-4)


@pytest.mark.gpu
def test_gpu_replays_do_not_sync_and_detect_non_finite_losses():
    flow = Glow(384, levels=3, depth=3, hidden=32).cuda()
    step = TrainStep(flow, torch.optim.AdamW(flow.parameters(), lr=1e-3))
    batches = _batches("cuda", channels=384, rows=64 * 8, batch=64)
    for x in batches[:3]:
        step(x)  # eager (init), eager, then capture + replay
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(x) for x in batches[3:6]]
        bad = batches[6].clone()
        bad[0, 0] = float("inf")
        losses.append(step(bad))
        losses.append(step(batches[7]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.steps == 8
    with pytest.raises(FloatingPointError, match="at step 7 "):
        step.read(losses)
