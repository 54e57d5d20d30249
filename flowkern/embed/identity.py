"""What determines a job's output bytes, as a job identity, and the digests that go into it.

A job is: the flow's files, the encoder's files (weights, config, tokenizer), the input files (by path; their
rows are checked shard by shard through digests of the rows), every option that changes the bytes, and what
computes them (device kind and encoder precision). Measured (all-MiniLM-L6-v2 on a CPU with native bf16):
--batch-tokens 512, 2048 or 16384 change the embeddings by up to 2e-2, while 1 or 2 threads give equal bytes;
so batch tokens are part of the identity and the thread count is not.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch

DIGEST_CACHE_FILE = "file-digests.json"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def json_sha256(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def rows_sha256(ids: Iterable[str], texts: Iterable[str]) -> str:
    """Digest of a shard's input rows (ids and texts, in order)."""
    digest = hashlib.sha256()
    for row_id, text in zip(ids, texts):
        digest.update(row_id.encode("utf-8", "surrogatepass") + b"\0" + text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def default_digest_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flowkern" / DIGEST_CACHE_FILE


class FileDigests:
    """sha256 of files, remembered in a small JSON file (default: the user's cache directory) by path, size,
    mtime, ctime and inode, so an 88 MB encoder checkpoint is hashed once rather than on every run. The cache
    only saves time: an unreadable or unwritable cache file means hashing again."""

    def __init__(self, cache_file: Path | None = None):
        self.cache_file = cache_file or default_digest_cache()
        try:
            entries = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        self._entries: dict = entries if isinstance(entries, dict) else {}
        self._changed = False

    def sha256(self, path: Path) -> str:
        path = path.resolve()
        stat = path.stat()
        # ctime cannot be set back by `touch -d`, so an edit that restores the mtime still misses the cache.
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        entry = self._entries.get(str(path))
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            return entry["sha256"]
        digest = sha256_file(path)
        self._entries[str(path)] = {"stamp": stamp, "sha256": digest}
        self._changed = True
        return digest

    def save(self) -> None:
        if not self._changed:
            return
        kept = {name: entry for name, entry in self._entries.items() if Path(name).is_file()}
        tmp = self.cache_file.with_name(f".{self.cache_file.name}.tmp-{os.getpid()}")
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(kept), encoding="utf-8")
            os.replace(tmp, self.cache_file)
        except OSError:
            tmp.unlink(missing_ok=True)


def directory_files(directory: Path, digests: FileDigests) -> dict[str, str]:
    """{name: sha256} of a directory's top-level files (hidden ones left out)."""
    return {p.name: digests.sha256(p) for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.startswith(".")}


def encoder_identity(name: str, digests: FileDigests) -> dict:
    """The encoder a saved model names: a local directory by its files' digests, a HuggingFace hub model by the
    commit of its cached snapshot (immutable on the hub)."""
    from flowkern.models.encoder import local_first, resolve_encoder_source

    source, local = resolve_encoder_source(name)
    if local:
        return {"name": name, "files": directory_files(Path(source), digests)}
    from transformers.utils import cached_file

    # Finds (or, when the hub answers, fetches) the model's config.json; its snapshot directory is named by the hub
    # commit. Uncached and offline: one line at once, as loading the encoder says it.
    config = local_first(functools.partial(cached_file, source, "config.json"), source)
    return {"name": name, "revision": Path(config).parent.name}


def compute_identity(devices: list[torch.device]) -> list[str]:
    """What computes the embeddings, as far as it changes them: device kind (CPU instruction set or GPU model)
    and whether the encoder runs in bf16."""
    from flowkern.models.encoder import default_bf16

    described = set()
    for device in devices:
        kind = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"cpu {torch.backends.cpu.get_cpu_capability()}")
        described.add(f"{kind} {'bf16' if default_bf16(device) else 'fp32'}")
    return sorted(described)
