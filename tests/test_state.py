"""Library code chooses the backend and the finite checks for its own calls only: a with-block in one thread (or
asyncio task) leaves every other thread, and the user's process-wide choice, as they were."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import flowkern
from flowkern import backend
from flowkern._checks import check_input, finite_checks
from flowkern.models import BertFlow, SentenceEncoder

NAN_BATCH = torch.tensor([[float("nan"), 0.0]])


def in_another_thread(function):
    """function() run in a fresh thread, which starts from an empty context as any thread the user starts."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function).result()


def scans_for_nan() -> bool:
    try:
        check_input(NAN_BATCH, 2, "test")
    except ValueError:
        return True
    return False


def test_backend_override_holds_in_its_own_context_only():
    flowkern.set_backend("torch")
    with backend.override("auto"):
        assert backend.current() == "auto"
        assert in_another_thread(backend.current) == "torch"
        flowkern.set_backend("auto")   # the user's choice, changed meanwhile, survives the block
    assert backend.current() == "auto"


def test_backend_override_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        with backend.override("cudnn"):
            pass


def test_compiled_code_reads_the_process_wide_backend_without_a_graph_break():
    # fullgraph=True raises on a graph break: a ContextVar read under tracing would be one.
    @torch.compile(fullgraph=True, backend="eager")
    def shifted(x):
        return x + (1.0 if backend.current() == "torch" else 2.0)

    x = torch.zeros(2)
    with backend.override("torch"):
        assert backend.current() == "torch"
        assert torch.equal(shifted(x), x + 2.0)   # the process-wide "auto"


def test_reference_fit_runs_its_ops_on_torch_and_leaves_other_threads_alone(tiny_bert):
    model = BertFlow(SentenceEncoder(tiny_bert), flow={"levels": 1, "depth": 1, "hidden": 8})
    pool_batch, seen = model.encoder.pool_batch, []

    def recording_pool_batch(*args, **kwargs):
        seen.append((backend.current(), in_another_thread(backend.current)))
        return pool_batch(*args, **kwargs)

    model.encoder.pool_batch = recording_pool_batch
    model.fit([f"sentence number {i}" for i in range(8)], epochs=1, batch_size=4, reference=True)
    assert seen and set(seen) == {("torch", "auto")}
    assert backend.current() == "auto"


def test_finite_checks_off_in_a_block_stay_on_in_other_threads():
    with finite_checks(False):
        assert not scans_for_nan()
        assert in_another_thread(scans_for_nan)
    assert scans_for_nan()


def test_set_finite_checks_is_process_wide_and_a_block_overrides_it():
    flowkern.set_finite_checks(False)
    assert not in_another_thread(scans_for_nan)
    with finite_checks(True):
        assert scans_for_nan()
    assert not scans_for_nan()


def test_ddi_suspended_in_one_thread_still_initializes_in_another():
    from flowkern.nn import ActNorm
    from flowkern.nn.actnorm import suspend_ddi

    layer = ActNorm(3)
    with suspend_ddi():
        assert not layer.ddi_pending()
        assert in_another_thread(layer.ddi_pending)
        in_another_thread(lambda: layer(torch.randn(8, 3) * 5 + 2))
    assert bool(layer.initialized) and not layer.ddi_pending()
