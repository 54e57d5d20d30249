"""BERT-flow (Li et al. 2020): a frozen encoder's pooled sentence embeddings mapped to N(0, I) by a Glow."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from flowkern.backend import override as override_backend
from flowkern.models.encoder import DEFAULT_MAX_LENGTH, DEFAULT_POOLING, EMBEDDED_ENCODER, SentenceEncoder
from flowkern.nn import Glow, TrainStep

FORMAT = "flowkern.bertflow"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "flow.safetensors"
BUNDLE_DIR = "encoder"
TRANSFORM_BATCH = 8192


@dataclass
class FitReport:
    """What one :meth:`BertFlow.fit` did: path ("fast" or "eager"), sizes, per-step losses (bits/dim) and
    timings in seconds: encode_seconds is the time spent in the encoder (fast path: encoding the distinct
    sentences up front; eager path: every batch), flow_seconds the rest, total_seconds the whole fit."""

    path: str
    n_sentences: int
    n_distinct: int
    epochs: int
    steps: int
    encode_seconds: float
    flow_seconds: float
    total_seconds: float
    losses: list[float] = field(repr=False)

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    def to_dict(self) -> dict:
        return asdict(self)


def bits_per_dim(flow: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood in bits per dimension, averaged over the batch."""
    return -flow.log_prob(x).mean() / (math.log(2.0) * x.shape[1])


class BertFlow:
    """Frozen encoder + pooling + normalizing flow; the flow's output is the sentence embedding.

    ``encoder``: HuggingFace name, local directory, a :class:`SentenceEncoder` to share (its cache too),
    or None for the embedded all-MiniLM-L6-v2. ``flow``: a Glow, a Glow config dict (original JSON
    keys accepted), or None for the original code's default (3 levels, depth 3, width 32, additive
    coupling, fixed channel reversal). ``seed`` seeds the flow's initialization when it is built here;
    ``pooling``, ``max_length``, ``device``, ``cache_dir`` and ``quantize`` apply when the encoder is built here.
    ``quantize="int8"`` (CPU embedding jobs): the encoder's linear layers dynamically quantized to int8 for
    encoding (faster, slightly different embeddings; see the README's measured results); not saved with the model.
    """

    def __init__(self, encoder: str | os.PathLike | SentenceEncoder | None = None, pooling: str = DEFAULT_POOLING,
                 flow: torch.nn.Module | dict | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 device: str | torch.device | None = None, cache_dir: str | os.PathLike | None = None,
                 seed: int = 0, quantize: str | None = None) -> None:
        if isinstance(encoder, SentenceEncoder):
            if quantize is not None:
                raise ValueError("quantize= applies to an encoder built here; pass it to the SentenceEncoder")
            self.encoder = encoder
        else:
            self.encoder = SentenceEncoder(encoder, pooling, max_length, device, cache_dir, quantize)
        if isinstance(flow, torch.nn.Module) and not isinstance(flow, Glow):
            raise ValueError(f"flow must be a flowkern.nn.Glow or a Glow config dict, got {type(flow).__name__}")
        if not isinstance(flow, torch.nn.Module):
            with _seeded(seed, self.device):
                flow = Glow(self.encoder.dim) if flow is None else Glow.from_config(flow, channels=self.encoder.dim)
        if flow.config.get("channels") != self.encoder.dim:
            raise ValueError(f"the flow has {flow.config.get('channels')} channels; the encoder's embeddings have "
                             f"{self.encoder.dim}")
        self.flow = flow.to(self.device).eval()

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def fit(self, sentences: Sequence[str], epochs: int = 1, batch_size: int = 64, lr: float = 1e-3,
            weight_decay: float = 0.01, clip_norm: float = 1.0, seed: int = 0, reference: bool = False,
            encode_batch_size: int = 128, progress: bool = False, max_steps: int | None = None) -> FitReport:
        """Fit the flow by maximum likelihood (bits/dim) on unlabelled sentences; returns a FitReport.

        AdamW (eps 1e-6, decoupled weight decay on every flow parameter, as the original's
        AdamWeightDecayOptimizer, whose LayerNorm/bias exclusions match no flow variable), constant lr,
        global grad-norm clipping. The first batch initializes ActNorm from data. Fast path: pooled
        embeddings of the distinct sentences are computed once and cached. ``reference=True``: the
        original recipe, the encoder re-run on every batch padded to max_length with dropout on, and the
        flow on the eager torch backend. ``max_steps``: stop after that many steps (the first batches of the
        same shuffled order), for timing a path on a stated number of steps.
        """
        sentences = [sentences] if isinstance(sentences, str) else list(sentences)
        if len(sentences) < 2:
            # ActNorm initializes from the first batch's per-channel statistics, which one sentence has not.
            raise ValueError("cannot fit on an empty corpus: need at least 2 sentences" if not sentences else
                             "need at least 2 sentences to fit the flow, got 1")
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        started = time.perf_counter()
        encode_seconds = 0.0
        if reference:
            def batch_of(indices: torch.Tensor) -> torch.Tensor:
                nonlocal encode_seconds
                t0 = time.perf_counter()
                pooled = self.encoder.pool_batch([sentences[i] for i in indices.tolist()], reference=True)
                encode_seconds += time.perf_counter() - t0
                return pooled
            # This fit's own ops only: the user's process-wide backend choice stays as it is for other threads.
            backend = override_backend("torch")
        else:
            cached = self.encoder.encode(sentences, encode_batch_size, progress)
            encode_seconds = time.perf_counter() - started

            def batch_of(indices: torch.Tensor) -> torch.Tensor:
                return cached[indices]
            backend = contextlib.nullcontext()

        # One multi-tensor update for the flow's ~100 small parameters (the default per-tensor loop costs more
        # than the flow's own step at batch 64): on CPU the fused kernel (foreach there still runs ~10 ops per
        # tensor), on CUDA foreach, the implementation TrainStep's graph capture is verified with.
        implementation = {"fused": True} if self.device.type == "cpu" else {"foreach": True}
        optimizer = torch.optim.AdamW(self.flow.parameters(), lr=lr, weight_decay=weight_decay, eps=1e-6,
                                      **implementation)
        # One step = forward, backward, clipping, AdamW (a CUDA graph replay on GPU); losses stay on the device
        # and are read once per epoch, and for the progress bar at most twice a second.
        step = TrainStep(self.flow, optimizer, clip_norm=clip_norm, loss="bits_per_dim",
                         graphs=False if reference else None)
        shuffler = torch.Generator().manual_seed(seed)
        steps_per_epoch = math.ceil(len(sentences) / batch_size)
        total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
        losses: list[float] = []
        with _seeded(seed, self.device), backend, tqdm(total=total_steps, desc="fitting flow",
                                                       unit="step", disable=not progress) as bar:
            self.flow.train()
            try:
                for epoch in range(epochs):
                    order = torch.randperm(len(sentences), generator=shuffler)
                    if not reference:
                        order = order.to(cached.device)  # one copy per epoch, not one per batch
                    epoch_losses, shown = [], 0.0
                    for indices in order.split(batch_size)[:total_steps - len(losses)]:
                        epoch_losses.append(step(batch_of(indices)))
                        bar.update()
                        if progress and time.perf_counter() - shown > 0.5:
                            shown = time.perf_counter()
                            bar.set_postfix(bits_per_dim=f"{float(epoch_losses[-1]):.3f}", refresh=False)
                    losses += step.read(epoch_losses)
                    if len(losses) == total_steps:
                        break
            except FloatingPointError as error:
                raise FloatingPointError(f"{error}; epoch {epoch + 1}") from None
            finally:
                self.flow.eval()
        total = time.perf_counter() - started
        return FitReport("eager" if reference else "fast", len(sentences), len(set(sentences)), epochs, len(losses),
                         encode_seconds, total - encode_seconds, total, losses)

    def pooled(self, sentences: str | Sequence[str], batch_size: int = 128, progress: bool = False) -> torch.Tensor:
        """Pooled encoder embeddings [N, D] (no flow), from the cache where possible; a str is one sentence ([D])."""
        if isinstance(sentences, str):
            return self.encoder.encode([sentences], batch_size, progress)[0]
        return self.encoder.encode(sentences, batch_size, progress)

    def transform(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Apply the flow to already-pooled embeddings; numpy in, float32 numpy out; tensor in, tensor out."""
        as_numpy = not isinstance(embeddings, torch.Tensor)
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32) if as_numpy else embeddings)
        if x.ndim != 2 or x.shape[1] != self.encoder.dim:
            raise ValueError(f"expected embeddings of shape [N, {self.encoder.dim}], got {tuple(x.shape)}")
        self.flow.eval()
        with torch.no_grad(), self.flow.frozen():   # the parameters are packed once for all chunks
            z = torch.cat([self.flow(chunk.to(self.device, torch.float32))[0]
                           for chunk in x.split(TRANSFORM_BATCH)]) if len(x) else x.to(self.device, torch.float32)
        return z.cpu().numpy() if as_numpy else z.to(x.device)

    def encode(self, sentences: str | Sequence[str], batch_size: int = 128, as_tensor: bool = False,
               progress: bool = False) -> np.ndarray | torch.Tensor:
        """Sentence embeddings: pooled encoder output through the flow. float32 numpy [N, D], or a tensor; a str
        is one sentence and gives a [D] vector (as sentence-transformers does)."""
        if isinstance(sentences, str):
            return self.encode([sentences], batch_size, as_tensor, progress)[0]
        embeddings = self.transform(self.pooled(sentences, batch_size, progress))
        return embeddings if as_tensor else embeddings.cpu().numpy()

    def save(self, directory: str | os.PathLike, bundle: bool = False) -> Path:
        """Write config.json (encoder reference, pooling, flow config) and flow.safetensors; no pickle.

        The encoder is recorded as the embedded marker, its hub name, or a local directory's path relative to
        ``directory`` (move the two together). ``bundle=True`` copies the encoder (config, weights, tokenizer)
        into ``directory/encoder/`` and records that, so the directory is self-contained."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "encoder": self._encoder_record(directory, bundle),
            "pooling": self.encoder.pooling,
            "max_length": self.encoder.max_length,
            "flow": self.flow.config,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        # clone(): safetensors refuses tensors that share storage. Written by Python, not by safetensors' own
        # save_file (mode 0600), so both files get the same permissions.
        weights = {name: t.detach().cpu().contiguous().clone() for name, t in self.flow.state_dict().items()}
        (directory / WEIGHTS_FILE).write_bytes(save(weights, metadata={"format": FORMAT}))
        return directory

    def _encoder_record(self, directory: Path, bundle: bool) -> str:
        """How config.json names the encoder: a local directory relative to the model directory, starting with
        "." (hub names never do), so that moving both together keeps the model loadable."""
        if bundle:
            self.encoder.model.save_pretrained(directory / BUNDLE_DIR)
            self.encoder.tokenizer.save_pretrained(directory / BUNDLE_DIR)
            return f"./{BUNDLE_DIR}"
        name = self.encoder.name
        if name == EMBEDDED_ENCODER or not Path(name).is_absolute():
            return name
        relative = Path(os.path.relpath(name, directory.resolve())).as_posix()
        return relative if relative.startswith(".") else f"./{relative}"

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
             cache_dir: str | os.PathLike | None = None, quantize: str | None = None) -> BertFlow:
        """Rebuild a model written by :meth:`save` (the encoder is loaded from its recorded name or path, a relative
        path from ``directory``); ``quantize`` as in the constructor."""
        config, weights_path = read_saved_config(Path(directory))
        encoder = SentenceEncoder(config["encoder"], config["pooling"], config["max_length"], device, cache_dir,
                                  quantize)
        flow = Glow.from_config(config["flow"], channels=encoder.dim)
        try:
            weights = load_file(weights_path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{weights_path}: damaged, not readable as safetensors ({error}); save the model "
                             f"again") from None
        mismatch = _state_mismatch(flow.state_dict(), weights)
        if mismatch:
            raise ValueError(f"{weights_path} does not match {Path(directory) / CONFIG_FILE} (a flow of "
                             f"{flow.config} on a {encoder.dim}-dim encoder): {mismatch}")
        flow.load_state_dict(weights)
        return cls(encoder, flow=flow)


def read_saved_config(directory: Path) -> tuple[dict, Path]:
    """(config, path of the flow weights) of a saved model directory, checked, the encoder's relative path made
    absolute; one-line errors naming the file."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model directory (a BertFlow saved with `flowkern fit`)")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved BertFlow model: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error}); the model directory is damaged") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: not a {FORMAT} v{FORMAT_VERSION} config "
                         f"(format {config.get('format')!r}, version {config.get('format_version')!r})")
    missing = [key for key in ("encoder", "pooling", "max_length", "flow") if key not in config]
    if missing:
        raise ValueError(f"{config_path}: missing keys {missing}")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete BertFlow model: {WEIGHTS_FILE} is missing")
    if str(config["encoder"]).startswith("."):
        encoder = (directory / config["encoder"]).resolve()
        if not encoder.is_dir():
            raise FileNotFoundError(f"{config_path}: the encoder directory {config['encoder']} ({encoder}) is "
                                    f"missing; move it together with the model directory, or save with "
                                    f"bundle=True (flowkern fit --bundle)")
        config["encoder"] = str(encoder)
    return config, weights_path


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """How saved weights differ from the tensors a config's flow has, in one line ("" when they match)."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensors missing (first {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the config has no place for (first {unexpected[0]})")
    shapes = [name for name in sorted(set(expected) & set(found)) if expected[name].shape != found[name].shape]
    if shapes:
        name = shapes[0]
        problems.append(f"{len(shapes)} tensors of another shape (first {name}: {list(found[name].shape)} saved, "
                        f"{list(expected[name].shape)} expected)")
    return "; ".join(problems)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's global RNGs for the block, then restore them (dropout and init draw from these)."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
