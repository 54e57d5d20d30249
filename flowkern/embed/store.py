"""The output directory of an embedding job: its lock, manifest, shards and their done markers, and reading it.

Layout:
    job.lock               flock'ed by the running job (its pid inside); the OS releases it when the job dies
    manifest.json          what the job is (model, encoder, inputs, options, devices): written first,
                           completed at the end with every shard's marker
    shard-00000.npy        embeddings [rows, D] (float32 or float16)      (--format npy)
    shard-00000.ids.npy    the rows' ids, a unicode array (no pickle)
    shard-00000.parquet    columns id, embedding                           (--format parquet)
    shard-00000.done.json  written last: the job's digest, rows, dim, the digest of the input rows, and each
                           file's name, byte size and sha256
Every file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from flowkern._extras import require_extra

MANIFEST = "manifest.json"
LOCK_FILE = "job.lock"
FORMAT = "flowkern.embed"
FORMAT_VERSION = 2
OUTPUT_FORMATS = ("npy", "parquet")


class OutputLock:
    """An exclusive flock on OUT/job.lock, held for the job's lifetime. A second job fails at once, naming the
    holder's pid; the OS releases the lock when the holder dies, however it dies."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.created_dir = not out.exists()
        while True:
            out.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the directory went away with a job that failed at its start
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 100, 0).decode(errors="replace").strip() or "pid not recorded yet"
                os.close(fd)
                raise BlockingIOError(f"{out} is in use by another flowkern embed job ({holder}); wait for it to "
                                      f"end or choose another --out") from None
            # A job that failed at its start removes the lock file (and maybe the directory) before unlocking:
            # then lock the file now at the path instead.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self, remove: bool = False) -> None:
        """Unlock; remove=True also removes the lock file (and the directory, if this job created it and it is
        now empty), done while still holding the lock."""
        if remove:
            self.path.unlink(missing_ok=True)
            if self.created_dir:
                try:
                    self.path.parent.rmdir()
                except OSError:  # not empty: something else is there
                    pass
        os.close(self._fd)


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


def marker_path(out: Path, index: int) -> Path:
    return out / f"{shard_stem(index)}.done.json"


def write_file(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename into place; a failure (disk full, ...) names the file and cause."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path} ({len(data)} bytes): {error.strerror or error}; "
                                   f"fix that, then run again with --resume") from None


def write_json(path: Path, payload: dict) -> None:
    write_file(path, (json.dumps(payload, indent=1) + "\n").encode())


def read_json(path: Path) -> dict:
    """A JSON object from path; ValueError naming the file when it is not one (FileNotFoundError if absent)."""
    try:
        payload = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: unreadable (a JSON {type(payload).__name__}, not an object)")
    return payload


def remove_shard(out: Path, index: int) -> None:
    for path in out.glob(f"{shard_stem(index)}.*"):
        path.unlink()


def remove_stale_temporaries(out: Path) -> None:
    """Half-written files of a killed run (no other job writes here: this one holds the lock)."""
    for stale in out.glob(".*.tmp-*"):
        stale.unlink()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _parquet_bytes(ids: list[str], embeddings: np.ndarray) -> bytes:
    require_extra("embed", "parquet output", "pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = pa.array(embeddings.reshape(-1))
    table = pa.table({"id": pa.array(ids, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(values, embeddings.shape[1])})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_shard(out: Path, index: int, ids: list[str], embeddings: np.ndarray, fmt: str, job_sha256: str,
                input_sha256: str) -> dict:
    """Write shard `index` and then its done marker; returns the marker."""
    stem = shard_stem(index)
    if fmt == "npy":
        payloads = {f"{stem}.npy": _npy_bytes(embeddings), f"{stem}.ids.npy": _npy_bytes(np.array(ids, dtype=str))}
    else:
        payloads = {f"{stem}.parquet": _parquet_bytes(ids, embeddings)}
    files = []
    for name, data in payloads.items():
        write_file(out / name, data)
        files.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    marker = {"job": job_sha256, "index": index, "rows": len(ids), "dim": int(embeddings.shape[1]),
              "input_sha256": input_sha256, "first_id": ids[0], "last_id": ids[-1], "files": files}
    write_json(marker_path(out, index), marker)
    return marker


def _checked_bytes(path: Path, entry: dict) -> bytes:
    """A shard file's bytes, or ValueError naming the file when it is missing or not what its marker says."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    if len(data) != entry["bytes"]:
        raise ValueError(f"{path}: {len(data)} bytes, its done marker says {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{path}: its content differs from its done marker's sha256")
    return data


def damaged_file(out: Path, marker: dict) -> str | None:
    """What is wrong with a shard's files against its done marker (missing, size, content), or None."""
    for entry in marker["files"]:
        try:
            _checked_bytes(out / entry["name"], entry)
        except ValueError as problem:
            return str(problem)
    return None


def read_manifest(out: Path) -> dict:
    path = out / MANIFEST
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: written by another flowkern version (format version "
                         f"{manifest.get('format_version')!r}, this one reads {FORMAT_VERSION})")
    return manifest


def read_output(out_dir: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(ids, embeddings [rows, D]) of a finished job, in input order. Every shard is checked against the
    manifest and its done marker (rows, byte sizes, sha256 of each file); a mismatch raises naming the file."""
    out = Path(out_dir).expanduser()
    if not (out / MANIFEST).is_file():
        raise FileNotFoundError(f"{out}: no {MANIFEST}; not the output of `flowkern embed`")
    manifest = read_manifest(out)
    if not manifest.get("complete"):
        raise ValueError(f"{out}: the job did not finish; run it again with --resume")
    shards, dim, dtype = manifest["shards"], manifest["dim"], manifest["job"]["options"]["dtype"]
    for position, shard in enumerate(shards):
        if shard["index"] != position:
            raise ValueError(f"{out / MANIFEST}: shard {position} ({marker_path(out, position).name}) is missing "
                             f"from it")
    if sum(shard["rows"] for shard in shards) != manifest["rows"]:
        raise ValueError(f"{out / MANIFEST}: its shards hold {sum(s['rows'] for s in shards)} rows, it says "
                         f"{manifest['rows']} (a shard entry is missing)")
    ids: list[str] = []
    parts = []
    for position, shard in enumerate(shards):
        marker_file = marker_path(out, position)
        if not marker_file.is_file():
            raise ValueError(f"{marker_file}: missing")
        if read_json(marker_file) != shard:
            raise ValueError(f"{marker_file}: does not match the manifest's entry for shard {position}")
        shard_ids, embeddings = _read_shard(out, shard)
        if len(shard_ids) != shard["rows"] or embeddings.shape != (shard["rows"], dim):
            raise ValueError(f"{out / shard['files'][0]['name']}: {len(shard_ids)} ids and {embeddings.shape[0]} "
                             f"x {embeddings.shape[1]} embeddings, its done marker says {shard['rows']} x {dim}")
        ids += shard_ids
        parts.append(embeddings)
    return ids, (np.concatenate(parts) if parts else np.empty((0, dim), dtype=dtype))


def _read_shard(out: Path, shard: dict) -> tuple[list[str], np.ndarray]:
    contents = [_checked_bytes(out / entry["name"], entry) for entry in shard["files"]]
    if len(contents) == 2:  # npy: embeddings, ids
        return (np.load(io.BytesIO(contents[1]), allow_pickle=False).tolist(),
                np.load(io.BytesIO(contents[0]), allow_pickle=False))
    require_extra("embed", "parquet output", "pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(contents[0]))
    embedding = table.column("embedding").combine_chunks()
    return table.column("id").to_pylist(), embedding.values.to_numpy().reshape(len(embedding), -1)
