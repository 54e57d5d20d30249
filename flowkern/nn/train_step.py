"""One maximum-likelihood training step for a flow, with no host round trips: a CUDA graph replay once warm."""
from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import finite_checks

LOSSES = ("nll", "bits_per_dim")
# Eager runs of a batch shape before it is captured: nothing may compile, allocate caches or read the host
# while a graph is being recorded, and the first run of a fresh flow takes the data-dependent-init path.
EAGER_RUNS_BEFORE_CAPTURE = 2


class TrainStep:
    """`loss = step(x)`: forward, backward, global-norm gradient clipping and the optimizer step.

    loss="nll": -flow.log_prob(x).mean() in nats; "bits_per_dim": that divided by ln(2) * (values per sample).
    clip_norm=None: no clipping. The returned loss is a 0-dim tensor on the flow's device; nothing here waits for
    the device. A non-finite loss is recorded on the device and raised (FloatingPointError naming the step,
    1-based) by the next `check()` or `read()`; on CPU, where reading costs nothing, by the step itself.

    On CUDA (graphs=None: whenever the flow is on a GPU) each batch shape runs eagerly the first two times (on a
    side stream: the first call also does ActNorm's data-dependent init on the per-op path, the second compiles
    and initializes what the fast path needs) and is captured as a CUDA graph the third time; later batches of
    that shape are one graph replay. A new shape (the last, smaller batch of an epoch) captures
    its own graph; graphs share one memory pool. An lr change in the param groups recaptures. The optimizer's
    param groups are switched to capturable=True (same update, state kept on the device); Adam/AdamW with
    foreach or fused implementations hold the same state as without graphs.
    """

    def __init__(self, flow: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float | None = 1.0,
                 loss: str = "nll", graphs: bool | None = None):
        if loss not in LOSSES:
            raise ValueError(f"TrainStep: loss must be one of {LOSSES}, got {loss!r}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"TrainStep: clip_norm must be positive or None, got {clip_norm}")
        parameter = next(flow.parameters(), None)
        if parameter is None:
            raise ValueError("TrainStep: the flow has no parameters")
        self.flow, self.optimizer, self.clip_norm, self.loss = flow, optimizer, clip_norm, loss
        self.device = parameter.device
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"TrainStep: CUDA graphs need the flow on a GPU, it is on {self.device}")
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.steps = 0
        self._step_number = torch.zeros((), dtype=torch.int64, device=self.device)
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._seen: dict[tuple, int] = {}
        self._captured: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}
        self._pool = None
        if self.graphs:
            self._make_capturable()

    def _make_capturable(self) -> None:
        for group in self.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device != self.device:
                state["step"] = step.to(self.device, torch.float32)

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        nll = -self.flow.log_prob(x).mean()
        if self.loss == "bits_per_dim":
            nll = nll / (math.log(2.0) * x[0].numel())
        return nll

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        """The whole step as device work only (this is what a graph captures)."""
        # Graphs write gradients in place; eager steps let autograd hand over fresh ones (no zeroing, no add).
        self.optimizer.zero_grad(set_to_none=not self.graphs)
        loss = self._loss(x)
        loss.backward()
        if self.clip_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.optimizer.step()
        self._step_number.add_(1)
        newly_bad = (~torch.isfinite(loss)) & (self._first_bad_step < 0)
        self._first_bad_step.copy_(torch.where(newly_bad, self._step_number, self._first_bad_step))
        return loss.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"TrainStep: expected a torch.Tensor batch, got {type(x).__name__}")
        if x.device != self.device:
            raise ValueError(f"TrainStep: batch is on {x.device}, the flow on {self.device}")
        self.steps += 1
        # The input NaN/Inf scan would sync every step; a non-finite input shows up as a non-finite loss instead.
        with finite_checks(False):
            if not self.graphs:
                loss = self._body(x)
                if self.device.type == "cpu":
                    self.check()
                return loss
            return self._graph_step(x)

    def _graph_step(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, tuple(_lr(group) for group in self.optimizer.param_groups))
        entry = self._captured.get(key)
        if entry is None:
            seen = self._seen.get(key, 0)
            self._seen[key] = seen + 1
            if seen < EAGER_RUNS_BEFORE_CAPTURE:
                return self._side_stream_step(x)
            entry = self._capture(x, key)
        static_x, static_loss, graph = entry
        static_x.copy_(x)
        graph.replay()
        return static_loss.clone()

    def _side_stream_step(self, x: torch.Tensor) -> torch.Tensor:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            loss = self._body(x)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return loss

    def _capture(self, x: torch.Tensor, key: tuple):
        """Records the step for this shape (recording runs nothing: the caller replays it for this batch)."""
        for p in self.params:  # graphs write gradients in place: they must exist before any capture
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=self._pool):
            static_loss = self._body(static_x)
        self._pool = graph.pool()
        entry = (static_x, static_loss, graph)
        self._captured[key] = entry
        return entry

    def reset(self) -> None:
        """Drop the captured graphs (the next batches run eagerly, then capture again)."""
        self._captured.clear()
        self._seen.clear()
        self._pool = None

    def check(self) -> None:
        """Raise FloatingPointError if any step so far had a non-finite loss (a device sync)."""
        bad = int(self._first_bad_step)
        if bad >= 0:
            raise FloatingPointError(f"non-finite loss at step {bad} (NaN/Inf in the batch, or a diverging fit: "
                                     f"try a lower lr or additive coupling)")

    def read(self, losses: list[torch.Tensor]) -> list[float]:
        """The given step losses as floats, in one device sync, after check()."""
        values = torch.stack(losses).tolist() if losses else []
        self.check()
        return values


def _lr(group: dict):
    lr = group.get("lr")
    return id(lr) if isinstance(lr, torch.Tensor) else lr
