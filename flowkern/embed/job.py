"""The offline embedding job: input streamed in, sharded and resumable output, one worker per device.

Layout of an output directory:
    manifest.json          what the job is (model, inputs, options): written first, completed at the end
    shard-00000.npy        embeddings [rows, D] (float32 or float16)      (--format npy)
    shard-00000.ids.npy    the rows' ids, a unicode array (no pickle)
    shard-00000.parquet    columns id, embedding                           (--format parquet)
    shard-00000.done.json  written last, atomically: the shard is complete (rows, files)
Shard k holds input rows [k * shard_rows, (k + 1) * shard_rows) in input order, so a resumed run (after a crash or
kill -9) skips the shards marked done and produces exactly the rows of an uninterrupted one. Every file is
written to a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from flowkern._checks import finite_checks
from flowkern.embed.feeder import Prefetcher, default_batch_tokens, token_batches
from flowkern.embed.reader import input_files, iter_rows

MANIFEST = "manifest.json"
FORMAT = "flowkern.embed"
FORMAT_VERSION = 1
OUTPUT_FORMATS = ("npy", "parquet")
OUTPUT_DTYPES = ("float32", "float16")
DEFAULT_SHARD_ROWS = 100_000


@dataclass
class EmbedReport:
    """What one run did: rows and shards written (skipped: already done before a --resume), seconds, rows/s."""
    out_dir: Path
    rows: int
    shards: int
    shards_skipped: int
    seconds: float
    dim: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8"))


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _model_identity(model_dir: Path) -> dict:
    digest = hashlib.sha256()
    for name in ("config.json", "flow.safetensors"):
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return {"path": str(model_dir.resolve()), "sha256": digest.hexdigest()}


def _shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


def _done_marker(out_dir: Path, index: int) -> Path:
    return out_dir / f"{_shard_stem(index)}.done.json"


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory (a BertFlow saved with `flowkern fit`)")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a saved BertFlow model (config.json is missing)")


def _prepare_out_dir(out_dir: Path, job: dict, resume: bool, overwrite: bool) -> None:
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            existing = {"unreadable": str(error)}
        same = existing.get("job") == job
        if overwrite:
            for path in out_dir.glob("shard-*"):
                path.unlink()
            manifest_path.unlink()
        elif not same:
            raise ValueError(f"{out_dir} holds the output of another job (other model, input or options, see its "
                             f"{MANIFEST}); pass --overwrite to replace it or choose another --out")
        elif not resume:
            raise ValueError(f"{out_dir} already holds this job's output; pass --resume to finish it or "
                             f"--overwrite to start over")
    elif resume and any(out_dir.glob("shard-*")):
        raise ValueError(f"{out_dir} has shard files but no {MANIFEST}; pass --overwrite to start over")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp-*"):  # half-written files of a killed run
        stale.unlink()
    if not manifest_path.is_file():
        _write_json(manifest_path, {"format": FORMAT, "format_version": FORMAT_VERSION, "job": job,
                                    "complete": False})


def _shards(rows: Iterator[tuple[str, str]], shard_rows: int) -> Iterator[tuple[int, list[str], list[str]]]:
    for index in itertools.count():
        chunk = list(itertools.islice(rows, shard_rows))
        if not chunk:
            return
        ids, texts = zip(*chunk)
        yield index, list(ids), list(texts)


def _write_shard(out_dir: Path, index: int, ids: list[str], embeddings: np.ndarray, fmt: str) -> None:
    stem = _shard_stem(index)
    if fmt == "npy":
        files = [f"{stem}.npy", f"{stem}.ids.npy"]
        _atomic_write(out_dir / files[0], lambda tmp: _save_npy(tmp, embeddings))
        _atomic_write(out_dir / files[1], lambda tmp: _save_npy(tmp, np.array(ids, dtype=str)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        files = [f"{stem}.parquet"]
        values = pa.array(embeddings.reshape(-1))
        table = pa.table({"id": pa.array(ids, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(values, embeddings.shape[1])})
        _atomic_write(out_dir / files[0], lambda tmp: pq.write_table(table, tmp))
    _write_json(_done_marker(out_dir, index), {"index": index, "rows": len(ids), "files": files})


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


class Embedder:
    """A loaded BertFlow turning windows of texts into embeddings (numpy, input order) through the feeder:
    tokenized once, length-sorted token-budget batches, pinned host memory and asynchronous copies on GPU, the
    flow applied on the device. Shared by the job, the Ray Data predictor and anyone embedding in-process."""

    def __init__(self, model, pooled: bool = False, batch_tokens: int | None = None, dtype: str = "float32"):
        self.model, self.encoder = model, model.encoder
        self.pooled, self.out_dtype = pooled, np.dtype(dtype)
        self.batch_tokens = batch_tokens or default_batch_tokens(self.encoder.device)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def tokenize(self, texts: list[str]):
        return token_batches(self.encoder.tokenizer, texts, self.encoder.max_length, self.batch_tokens,
                             pin_memory=self.encoder.device.type == "cuda")

    def embed_batches(self, batches, rows: int) -> np.ndarray:
        outputs = []
        # No per-batch NaN/Inf scan of the pooled vectors: on a GPU each would wait for the device.
        with finite_checks(False):
            for batch in batches:
                vectors = self.encoder.pool_tokens(batch.input_ids, batch.attention_mask)
                if not self.pooled:
                    vectors = self.model.transform(vectors)
                # Copied back without waiting (into pinned memory); read after the window's last batch.
                outputs.append((batch.positions, vectors.to("cpu", non_blocking=True)))
        if self.encoder.device.type == "cuda":
            torch.cuda.synchronize(self.encoder.device)
        result = np.empty((rows, self.dim), dtype=self.out_dtype)
        for positions, vectors in outputs:
            result[positions] = vectors.float().numpy().astype(self.out_dtype, copy=False)
        return result

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        return self.embed_batches(self.tokenize(texts), len(texts))


def _run_worker(inputs: list[str], model_dir: str, out_dir: str, options: dict, worker: int, workers: int,
                device: str | None, progress: bool) -> tuple[int, int, int]:
    """Embeds the shards k with k % workers == worker that are not done yet; returns (rows, shards, skipped)."""
    from flowkern.models import BertFlow

    out = Path(out_dir)
    embedder = Embedder(BertFlow.load(model_dir, device=device), options["pooled"], options["batch_tokens"],
                        options["dtype"])
    files = input_files(inputs)
    rows_iter = iter_rows(files, options["field"], options["column"], options["id_column"])

    skipped = 0

    def todo():
        nonlocal skipped
        for index, ids, texts in _shards(rows_iter, options["shard_rows"]):
            if index % workers != worker:
                continue
            if _done_marker(out, index).is_file():
                skipped += 1
                continue
            yield index, ids, texts, embedder.tokenize(texts)

    rows = shards = 0
    total = sum(1 for _ in iter_rows(files, options["field"], options["column"], options["id_column"])) \
        if progress else None
    bar = _progress(progress, None if total is None else total // workers)
    prefetch = Prefetcher(todo(), depth=2)  # tokenizes the next shard while this one runs
    try:
        for index, ids, texts, batches in prefetch:
            _write_shard(out, index, ids, embedder.embed_batches(batches, len(texts)), options["format"])
            rows += len(ids)
            shards += 1
            bar.update(len(ids))
    finally:
        prefetch.close()
        bar.close()
    return rows, shards, skipped


def _progress(enabled: bool, total: int | None):
    """sentences/s and, with a total, the ETA (a worker's share when there are several)."""
    from tqdm.auto import tqdm
    return tqdm(desc="embedding", unit="sentence", total=total, disable=not enabled, smoothing=0.1)


def _worker_entry(args) -> tuple[int, int, int]:
    torch.set_num_threads(args[-1])
    return _run_worker(*args[:-1])


def embed(inputs: str | os.PathLike | Sequence[str | os.PathLike], model: str | os.PathLike,
          out_dir: str | os.PathLike, *, shard_rows: int = DEFAULT_SHARD_ROWS, format: str = "npy",
          field: str = "text", column: str = "text", id_column: str | None = None, pooled: bool = False,
          dtype: str = "float32", resume: bool = False, overwrite: bool = False,
          batch_tokens: int | None = None, devices: Sequence[str] | None = None,
          progress: bool = False) -> EmbedReport:
    """Embed every row of `inputs` with the saved BertFlow in `model` (the flow applied; pooled=True: the
    encoder's pooled vectors) into sharded files in `out_dir`; read them back with read_output(out_dir).

    devices: one worker process per device (e.g. ["cuda:0", "cuda:1"]); None: this process, on the model's
    default device. Shards go to workers round robin (shard k to worker k % n), one manifest for all."""
    if format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {format!r}; choose one of {OUTPUT_FORMATS}")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"unknown output dtype {dtype!r}; choose one of {OUTPUT_DTYPES}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    model_dir = Path(model).expanduser()
    _check_model_dir(model_dir)
    files = input_files(inputs)
    _check_not_empty(files, field, column, id_column)
    out = Path(out_dir).expanduser()
    options = dict(shard_rows=shard_rows, format=format, field=field, column=column, id_column=id_column,
                   pooled=pooled, dtype=dtype, batch_tokens=batch_tokens)
    identity_options = {k: v for k, v in options.items() if k != "batch_tokens"}
    job = {"model": _model_identity(model_dir), "inputs": [_file_identity(p) for p, _ in files],
           "options": identity_options}
    _prepare_out_dir(out, job, resume, overwrite)
    specs = [str(s) for s in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]

    started = time.perf_counter()
    if not devices:
        rows, shards, skipped = _run_worker(specs, str(model_dir), str(out), options, 0, 1, None, progress)
    else:
        threads = max(1, (os.cpu_count() or 1) // len(devices))
        args = [(specs, str(model_dir), str(out), options, w, len(devices), d, progress and w == 0, threads)
                for w, d in enumerate(devices)]
        with multiprocessing.get_context("spawn").Pool(len(devices)) as pool:
            results = pool.map(_worker_entry, args)
        rows, shards, skipped = (sum(r[i] for r in results) for i in range(3))
    seconds = time.perf_counter() - started

    done = [json.loads(p.read_text(encoding="utf-8")) for p in out.glob("shard-*.done.json")]
    done.sort(key=lambda d: d["index"])
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    dim = _dim_of(out, done, format)
    manifest.update(complete=True, rows=sum(d["rows"] for d in done), dim=dim, shards=done)
    _write_json(out / MANIFEST, manifest)
    return EmbedReport(out, rows, shards, skipped, seconds, dim)


def _check_not_empty(files, field, column, id_column) -> None:
    for _ in iter_rows(files, field, column, id_column):
        return
    raise ValueError(f"empty input: no rows in {', '.join(str(p) for p, _ in files)}")


def _dim_of(out: Path, done: list[dict], fmt: str) -> int | None:
    if not done:
        return None
    first = out / done[0]["files"][0]
    if fmt == "npy":
        return int(np.load(first, mmap_mode="r").shape[1])
    import pyarrow.parquet as pq
    return int(pq.read_schema(first).field("embedding").type.list_size)


def read_output(out_dir: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(ids, embeddings [rows, D]) of a finished job, in input order."""
    out = Path(out_dir).expanduser()
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{out}: no {MANIFEST}; not the output of `flowkern embed`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: not a {FORMAT} manifest")
    if not manifest.get("complete"):
        raise ValueError(f"{out}: the job did not finish; run it again with --resume")
    ids: list[str] = []
    parts = []
    for shard in manifest["shards"]:
        files = [out / name for name in shard["files"]]
        if files[0].suffix == ".npy":
            parts.append(np.load(files[0], allow_pickle=False))
            ids += np.load(files[1], allow_pickle=False).tolist()
        else:
            import pyarrow.parquet as pq
            table = pq.read_table(files[0])
            ids += table.column("id").to_pylist()
            embedding = table.column("embedding").combine_chunks()
            parts.append(embedding.values.to_numpy().reshape(len(embedding), -1))
    dim = manifest.get("dim") or 0
    dtype = manifest["job"]["options"]["dtype"]
    return ids, (np.concatenate(parts) if parts else np.empty((0, dim), dtype=dtype))

