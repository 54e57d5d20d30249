"""The offline embedding job: input streamed in, sharded and resumable output, one worker per device.

Shard k holds input rows [k * shard_rows, (k + 1) * shard_rows) in input order, so a resumed run (after a crash or
kill -9) redoes only the shards without a valid done marker and gives exactly the bytes of an uninterrupted one.
What keeps a job from losing or mixing rows:
- the parent holds an exclusive lock on the output directory for the job's lifetime (store.OutputLock);
- worker processes die with the parent, and the parent fails at once, naming the cause, when one dies
  (workers.py);
- the manifest records the job's identity (identity.py: flow and encoder files, inputs, options, devices); an
  output directory of another job is refused, naming what differs;
- the parent reads the input once before embedding: its rows, duplicate ids, a digest of each shard's rows.
  --resume keeps a done shard only if its marker is this job's, its rows' digest matches the input as it is now
  and its files match their recorded sizes and sha256; it redoes damaged shards and refuses a changed input.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import re
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from flowkern._checks import finite_checks
from flowkern.embed.identity import FileDigests, compute_identity, encoder_identity, json_sha256, rows_sha256
from flowkern.embed.reader import input_files, iter_rows
from flowkern.embed.store import (FORMAT, FORMAT_VERSION, MANIFEST, OUTPUT_FORMATS, OutputLock, damaged_file,
                                  marker_path, read_json, read_manifest, read_output, remove_shard,
                                  remove_stale_temporaries, write_json, write_shard)
from flowkern.embed.workers import exit_if_orphaned, run_workers
from flowkern.models.batching import Prefetcher, default_batch_tokens, token_batches
from flowkern.models.encoder import check_quantize

__all__ = ["DEFAULT_SHARD_ROWS", "EmbedReport", "Embedder", "embed", "read_output"]

OUTPUT_DTYPES = ("float32", "float16")
DEFAULT_SHARD_ROWS = 100_000
_MARKER_NAME = re.compile(r"shard-(\d+)\.done\.json")


@dataclass
class EmbedReport:
    """What one run did: rows and shards written, shards already done and kept (--resume), shards found damaged
    or not this job's and redone, seconds, rows/s."""
    out_dir: Path
    rows: int
    shards: int
    shards_skipped: int
    shards_redone: int
    seconds: float
    dim: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


class Embedder:
    """A loaded BertFlow turning windows of texts into embeddings (numpy, input order) through the token batching:
    tokenized once, length-sorted token-budget batches, pinned host memory and asynchronous copies on GPU, the
    flow applied on the device once per window. Shared by the job, the Ray Data predictor and anyone embedding
    in-process."""

    def __init__(self, model, pooled: bool = False, batch_tokens: int | None = None, dtype: str = "float32"):
        self.model, self.encoder = model, model.encoder
        self.pooled, self.out_dtype = pooled, np.dtype(dtype)
        self.batch_tokens = default_batch_tokens(self.encoder.device) if batch_tokens is None else batch_tokens

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def tokenize(self, texts: list[str]):
        return token_batches(self.encoder.tokenizer, texts, self.encoder.max_length, self.batch_tokens,
                             pin_memory=self.encoder.device.type == "cuda")

    def embed_batches(self, batches, rows: int) -> np.ndarray:
        if rows == 0:
            return np.empty((0, self.dim), dtype=self.out_dtype)
        # The window's pooled vectors stay on the device, put back in input order by one index copy, and go through
        # the flow in one call: per batch, the flow's fixed cost per call (checks, path choice, packing, chunking)
        # was paid ~25 times per 4,000 sentences. No NaN/Inf scan of the pooled vectors (on a GPU it would wait
        # for the device); one copy back to the host per window.
        with finite_checks(False):
            pooled = [self.encoder.pool_tokens(batch.input_ids, batch.attention_mask) for batch in batches]
            positions = torch.as_tensor([i for batch in batches for i in batch.positions], device=pooled[0].device)
            vectors = torch.empty(rows, self.dim, device=pooled[0].device).index_copy_(0, positions, torch.cat(pooled))
            if not self.pooled:
                vectors = self.model.transform(vectors)
        return vectors.cpu().numpy().astype(self.out_dtype, copy=False)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """[N, D] embeddings of N texts; a single str is one sentence and gives a [D] vector."""
        if isinstance(texts, str):
            return self([texts])[0]
        texts = list(texts)
        return self.embed_batches(self.tokenize(texts), len(texts))


@dataclass(frozen=True)
class InputPlan:
    """The input as read once by the parent: rows per shard and a digest of each shard's rows."""
    shard_rows: list[int]
    shard_sha256: list[str]

    @property
    def rows(self) -> int:
        return sum(self.shard_rows)


@dataclass(frozen=True)
class WorkerTask:
    """One worker's share: shards k with k % workers == worker that are not in `skip`."""
    files: list[tuple[Path, str]]
    model_dir: str
    out_dir: str
    options: dict
    job_sha256: str
    skip: frozenset[int]
    worker: int
    workers: int
    device: str | None
    threads: int | None
    parent_pid: int | None  # None: runs in the job's own process
    progress_total: int | None  # None: no progress bar


def _rows(files, options: dict) -> Iterator[tuple[str, str]]:
    return iter_rows(files, options["field"], options["column"], options["id_column"])


def _shards(rows: Iterator[tuple[str, str]], shard_rows: int) -> Iterator[tuple[int, list[str], list[str]]]:
    for index in itertools.count():
        chunk = list(itertools.islice(rows, shard_rows))
        if not chunk:
            return
        ids, texts = zip(*chunk)
        yield index, list(ids), list(texts)


def _run_worker(task: WorkerTask) -> tuple[int, int]:
    """Embeds the task's shards; returns (rows, shards) written."""
    from flowkern.models import BertFlow

    if task.threads:
        torch.set_num_threads(task.threads)
    options, out = task.options, Path(task.out_dir)
    model = BertFlow.load(task.model_dir, device=task.device, quantize=options.get("quantize"))
    embedder = Embedder(model, options["pooled"],
                        options["batch_tokens"], options["dtype"])

    def todo():
        for index, ids, texts in _shards(_rows(task.files, options), options["shard_rows"]):
            if index % task.workers == task.worker and index not in task.skip:
                yield index, ids, rows_sha256(ids, texts), embedder.tokenize(texts)

    rows = shards = 0
    bar = _progress(task.progress_total)
    prefetch = Prefetcher(todo(), depth=2)  # tokenizes the next shard while this one runs
    try:
        for index, ids, input_sha256, batches in prefetch:
            embeddings = embedder.embed_batches(batches, len(ids))
            if task.parent_pid is not None:
                exit_if_orphaned(task.parent_pid)
            write_shard(out, index, ids, embeddings, options["format"], task.job_sha256, input_sha256)
            rows += len(ids)
            shards += 1
            bar.update(len(ids))
    finally:
        prefetch.close()
        bar.close()
    return rows, shards


def _progress(total: int | None):
    """sentences/s and the ETA (of this worker's share when there are several)."""
    from tqdm.auto import tqdm
    return tqdm(desc="embedding", unit="sentence", total=total, disable=total is None, smoothing=0.1)


def _id_hash(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def plan_input(files, options: dict) -> InputPlan:
    """Read the input once: rows and digest per shard; refuses an empty input and repeated --id-column values
    (8 bytes of memory per row for that check)."""
    sizes, digests = [], []
    id_hashes = array("Q") if options["id_column"] is not None else None
    for _, ids, texts in _shards(_rows(files, options), options["shard_rows"]):
        sizes.append(len(ids))
        digests.append(rows_sha256(ids, texts))
        if id_hashes is not None:
            id_hashes.extend(map(_id_hash, ids))
    if not sizes:
        raise ValueError(f"empty input: no rows in {', '.join(str(p) for p, _ in files)}")
    if id_hashes is not None:
        _check_unique_ids(files, options, id_hashes)
    return InputPlan(sizes, digests)


def _check_unique_ids(files, options: dict, id_hashes: array) -> None:
    hashes = np.sort(np.frombuffer(id_hashes, dtype=np.uint64))
    repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not repeated:
        return
    seen = set()
    for row_id, _ in _rows(files, options):  # only an id whose 64-bit hash repeats can repeat
        if _id_hash(row_id) in repeated:
            if row_id in seen:
                raise ValueError(f"duplicate id {row_id!r} in --id-column {options['id_column']!r}: every row "
                                 f"needs its own id")
            seen.add(row_id)


def _parse_devices(devices: Sequence[str] | None) -> list[torch.device] | None:
    if not devices:
        return None
    parsed = []
    for spec in devices:
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise ValueError(f"unknown device {spec!r} (use cpu, cuda or cuda:N)") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
                raise ValueError(f"device {spec!r}: CUDA is not available on this machine ({why}); use --devices "
                                 f"cpu")
            if (device.index or 0) >= torch.cuda.device_count():
                raise ValueError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        elif device.type != "cpu":
            raise ValueError(f"device {spec!r}: only cpu and cuda devices are supported")
        parsed.append(device)
    return parsed


def _differences(old: dict, new: dict) -> str:
    """What differs between two job identities, in words."""
    if not isinstance(old, dict):
        return "unrecorded job"
    found = []
    if old.get("model") != new["model"]:
        found.append("flow model")
    old_encoder, new_encoder = old.get("encoder") or {}, new["encoder"]
    if old_encoder.get("name") != new_encoder["name"]:
        found.append("encoder")
    elif old_encoder != new_encoder:
        changed = sorted(name for name in {**old_encoder.get("files", {}), **new_encoder.get("files", {})}
                         if old_encoder.get("files", {}).get(name) != new_encoder.get("files", {}).get(name))
        found.append(f"encoder files ({', '.join(changed)})" if changed else "encoder revision")
    if old.get("inputs") != new["inputs"]:
        found.append("input files")
    old_options, new_options = old.get("options") or {}, new["options"]
    found += [f"{key} {old_options.get(key)!r} (now {new_options.get(key)!r})"
              for key in dict.fromkeys([*new_options, *old_options]) if old_options.get(key) != new_options.get(key)]
    if old.get("compute") != new["compute"]:
        found.append(f"devices {old.get('compute')} (now {new['compute']})")
    return "its " + ", ".join(found) if found else "another identity"


def _prepare_out_dir(out: Path, job: dict, job_sha256: str, plan: InputPlan, resume: bool,
                     overwrite: bool) -> tuple[frozenset[int], int, bool]:
    """Check the output directory against this job (the lock is held). Returns (shards done and verified,
    shards that were invalid and are to be redone, whether this run wrote a new manifest)."""
    manifest_path = out / MANIFEST
    existing = None
    if manifest_path.exists():
        try:
            existing = read_manifest(out)
        except ValueError as error:
            if not overwrite:
                raise ValueError(f"{error}; the job that wrote {out} is unknown: pass --overwrite to replace its "
                                 f"output or choose another --out") from None
    if overwrite:
        for path in out.glob("shard-*"):
            path.unlink()
        manifest_path.unlink(missing_ok=True)
        existing = None
    elif existing is None and any(out.glob("shard-*")):
        raise ValueError(f"{out} holds shard files but no {MANIFEST} (left by an unknown job); pass --overwrite to "
                         f"replace them or choose another --out")
    elif existing is not None and existing.get("job") != job:
        raise ValueError(f"{out} holds the output of another job ({_differences(existing.get('job'), job)}; see "
                         f"its {MANIFEST}); pass --overwrite to replace it or choose another --out")
    elif existing is not None and not resume:
        state = "finished" if existing.get("complete") else "unfinished"
        raise ValueError(f"{out} already holds this job's {state} output; pass --resume to finish (or check) it "
                         f"or --overwrite to start over")
    remove_stale_temporaries(out)
    if existing is None:
        write_json(manifest_path, {"format": FORMAT, "format_version": FORMAT_VERSION, "job": job,
                                   "job_sha256": job_sha256, "complete": False})
        return frozenset(), 0, True
    kept, redone = _check_done_shards(out, job_sha256, plan)
    if existing.get("complete") and len(kept) < len(plan.shard_rows):
        write_json(manifest_path, {key: existing[key] for key in ("format", "format_version", "job", "job_sha256")}
                   | {"complete": False})
    return kept, redone, False


def _check_done_shards(out: Path, job_sha256: str, plan: InputPlan) -> tuple[frozenset[int], int]:
    """--resume: the done shards to keep; a shard that is not this job's or whose files fail their marker is
    removed, to be redone; a shard whose input rows changed stops the job."""
    kept, redone = set(), 0
    for path in sorted(out.glob("shard-*.done.json")):
        match = _MARKER_NAME.fullmatch(path.name)
        if match is None:
            continue
        index = int(match.group(1))
        try:
            marker = read_json(path)
        except ValueError:
            marker = None
        if marker is None or marker.get("job") != job_sha256 or marker.get("index") != index:
            remove_shard(out, index)
            redone += 1
            continue
        if index >= len(plan.shard_rows) or marker["input_sha256"] != plan.shard_sha256[index]:
            raise ValueError(f"the input changed since this job started: shard {index} was made from rows "
                             f"{marker['first_id']} to {marker['last_id']}, which now read differently (the input "
                             f"has {plan.rows} rows); pass --overwrite to start over")
        if damaged_file(out, marker) is not None:
            remove_shard(out, index)
            redone += 1
            continue
        kept.add(index)
    return frozenset(kept), redone


def _complete_manifest(out: Path, job: dict, job_sha256: str, plan: InputPlan) -> int:
    """Every shard's marker into the manifest, checked against the input as read at the start; returns dim."""
    markers = []
    for index, input_sha256 in enumerate(plan.shard_sha256):
        path = marker_path(out, index)
        marker = read_json(path)
        if marker.get("job") != job_sha256:
            raise ValueError(f"{path}: written by another job while this one held {out} (a process that ignores "
                             f"its lock?); run again with --resume")
        if marker.get("input_sha256") != input_sha256:
            raise ValueError(f"the input changed while this job ran: shard {index} (rows {marker.get('first_id')} "
                             f"to {marker.get('last_id')}) differs from what was read at the start; pass "
                             f"--overwrite to start over")
        markers.append(marker)
    write_json(out / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "job": job,
                                "job_sha256": job_sha256, "complete": True, "rows": plan.rows,
                                "dim": markers[0]["dim"], "shards": markers})
    return markers[0]["dim"]


def embed(inputs: str | os.PathLike | Sequence[str | os.PathLike], model: str | os.PathLike,
          out_dir: str | os.PathLike, *, shard_rows: int = DEFAULT_SHARD_ROWS, format: str = "npy",
          field: str = "text", column: str = "text", id_column: str | None = None, pooled: bool = False,
          dtype: str = "float32", resume: bool = False, overwrite: bool = False,
          batch_tokens: int | None = None, devices: Sequence[str] | None = None, quantize: str | None = None,
          progress: bool = False) -> EmbedReport:
    """Embed every row of `inputs` with the saved BertFlow in `model` (the flow applied; pooled=True: the
    encoder's pooled vectors) into sharded files in `out_dir`; read them back with read_output(out_dir).
    quantize="int8": the encoder's linear layers dynamically quantized to int8 (CPU only; faster, slightly
    different embeddings).

    devices: one worker process per device (e.g. ["cuda:0", "cuda:1"]); None: this process, on the model's
    default device. Shards go to workers round robin (shard k to worker k % n), one manifest for all."""
    from flowkern.models.bertflow import read_saved_config

    if format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {format!r}; choose one of {OUTPUT_FORMATS}")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"unknown output dtype {dtype!r}; choose one of {OUTPUT_DTYPES}")
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    if resume and overwrite:
        raise ValueError("--resume keeps the shards done, --overwrite deletes them: pass one of them")
    worker_devices = _parse_devices(devices)
    compute_devices = worker_devices or [torch.device("cuda" if torch.cuda.is_available() else "cpu")]
    for device in compute_devices:
        check_quantize(quantize, device)
    model_dir = Path(model).expanduser()
    config, weights = read_saved_config(model_dir)
    if batch_tokens is None:
        batch_tokens = default_batch_tokens(compute_devices[0])
    if batch_tokens < config["max_length"]:
        raise ValueError(f"batch_tokens ({batch_tokens}) must hold at least one sentence of the model's max_length "
                         f"({config['max_length']} tokens)")
    out = Path(out_dir).expanduser()
    files = input_files(inputs, exclude=out)
    options = dict(shard_rows=shard_rows, format=format, field=field, column=column, id_column=id_column,
                   pooled=pooled, dtype=dtype, batch_tokens=batch_tokens)
    if quantize is not None:   # only when set: the identities of unquantized jobs stay as they were
        options["quantize"] = quantize

    lock = OutputLock(out)
    wrote_manifest = False
    try:
        plan = plan_input(files, options)
        digests = FileDigests()
        job = {"model": {"path": str(model_dir.resolve()),
                         "files": {p.name: digests.sha256(p) for p in (model_dir / "config.json", weights)}},
               "encoder": encoder_identity(config["encoder"], digests),
               "inputs": [{"path": str(path.resolve()), "name": name} for path, name in files],
               "options": options, "compute": compute_identity(compute_devices)}
        digests.save()
        job_sha256 = json_sha256(job)
        skip, redone, wrote_manifest = _prepare_out_dir(out, job, job_sha256, plan, resume, overwrite)

        started = time.perf_counter()
        workers = len(worker_devices or [None])

        def rows_to_do(worker: int) -> int | None:  # the progress bar's total: worker 0's share
            return sum(n for k, n in enumerate(plan.shard_rows) if k % workers == worker and k not in skip) \
                if progress and worker == 0 else None

        if worker_devices is None:
            results = [_run_worker(WorkerTask(files, str(model_dir), str(out), options, job_sha256, skip, 0, 1,
                                              None, None, None, rows_to_do(0)))]
        else:
            tasks = [WorkerTask(files, str(model_dir), str(out), options, job_sha256, skip, w, workers, str(device),
                                max(1, (os.cpu_count() or 1) // workers), os.getpid(), rows_to_do(w))
                     for w, device in enumerate(worker_devices)]
            results = run_workers(_run_worker, tasks, [str(d) for d in worker_devices])
        dim = _complete_manifest(out, job, job_sha256, plan)
    except BaseException:
        # A start that failed before its first shard leaves nothing behind that would block the retry.
        if wrote_manifest and not any(out.glob("shard-*.done.json")):
            (out / MANIFEST).unlink(missing_ok=True)
        lock.release(remove=not (out / MANIFEST).exists())
        raise
    lock.release()
    return EmbedReport(out, sum(r for r, _ in results), sum(s for _, s in results), len(skip), redone,
                       time.perf_counter() - started, dim)
