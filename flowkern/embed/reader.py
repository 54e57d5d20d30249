"""Streaming input for the embedding job: .txt, .jsonl and .parquet files, a directory or a glob of them.

Rows are never loaded whole: files are read in chunks (parquet: in record batches). Every row gets a stable id,
`<file>:<line>` (1-based line number; parquet: `<file>:<row>`, 0-based), or the value of an id column/field.

What is an input: a name ending in .txt, .jsonl or .parquet, in any letter case; .txt and .jsonl may also be
gzip-compressed (.txt.gz, .jsonl.gz). Lines end in \\n, \\r\\n or a lone \\r. A directory is read recursively; any
other file in it is an error (nothing is skipped silently) except hidden ones (a name starting with "."), and
files under the job's own output directory are never inputs.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from flowkern._extras import require_extra

INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
ACCEPTED = ".txt, .jsonl, .parquet (any letter case; .txt and .jsonl also gzip-compressed as .txt.gz, .jsonl.gz)"
_PARQUET_BATCH = 8192
_READ_CHUNK = 1 << 20
_NEWLINE = re.compile(rb"\r\n|\r|\n")


def input_kind(path: Path) -> str | None:
    """The input suffix a file name ends with (".txt", ".jsonl.gz", ...), lower case; None: not an input."""
    name = path.name.lower()
    # Longest first, so "x.txt.gz" is ".txt.gz" and not some shorter match.
    return next((s for s in sorted(INPUT_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def input_files(inputs: str | os.PathLike | Sequence[str | os.PathLike],
                exclude: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """(path, name used in row ids) of each input file, in a fixed order.

    An input is a file, a directory (its input files, recursively, sorted) or a glob pattern. Files under
    `exclude` (the job's output directory) are left out of directories and globs."""
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise ValueError("no input given")
    excluded = Path(exclude).expanduser().resolve() if exclude is not None else None

    def wanted(path: Path) -> bool:
        return excluded is None or not path.resolve().is_relative_to(excluded)

    files: list[tuple[Path, str]] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files += _directory_files(path, wanted)
        elif path.is_file():
            if not wanted(path):
                raise ValueError(f"{path}: this input is inside the output directory {excluded}")
            files.append((path, path.name))
        elif any(ch in str(spec) for ch in "*?["):
            found = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if p.is_file() and wanted(p))
            if not found:
                raise ValueError(f"{spec}: the pattern matches no file")
            files += [(p, p.name) for p in found]
        else:
            raise FileNotFoundError(f"{spec}: no such file or directory")
    for path, _ in files:
        if input_kind(path) is None:
            raise ValueError(f"{path}: unknown input format {path.suffix or '(no suffix)'!r}; expected {ACCEPTED}")
    _check_distinct(files)
    return files


def _directory_files(directory: Path, wanted) -> list[tuple[Path, str]]:
    found, others = [], []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file() or not wanted(path):
            continue
        (found if input_kind(path) else others).append(path)
    if others:
        listed = ", ".join(p.relative_to(directory).as_posix() for p in others[:5])
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        raise ValueError(f"{directory}: {len(others)} files are not inputs ({listed}{more}); inputs are {ACCEPTED}; "
                         f"name the files to embed (or a glob) instead of the directory")
    if not found:
        raise ValueError(f"{directory}: no input files in this directory (inputs are {ACCEPTED})")
    return [(p, p.relative_to(directory).as_posix()) for p in found]


def _check_distinct(files: list[tuple[Path, str]]) -> None:
    """The same file twice, or two files under one name, would give rows the same ids."""
    seen: dict[str, Path] = {}
    for path, name in files:
        if name in seen:
            same = seen[name].resolve() == path.resolve()
            raise ValueError(f"{path}: given twice" if same else
                             f"{seen[name]} and {path} would both give row ids {name}:N; embed them in separate "
                             f"jobs or pass their common parent directory")
        seen[name] = path


def iter_rows(files: list[tuple[Path, str]], field: str = "text", column: str = "text",
              id_column: str | None = None) -> Iterator[tuple[str, str]]:
    """(id, text) for every row of every file, in order. Blank .txt lines are skipped (ids keep line numbers)."""
    for path, name in files:
        kind = input_kind(path)
        if kind.startswith(".txt"):
            yield from _txt_rows(path, name)
        elif kind.startswith(".jsonl"):
            yield from _jsonl_rows(path, name, field, id_column)
        else:
            yield from _parquet_rows(path, name, column, id_column)


def split_lines(handle: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary stream without their endings (\\n, \\r\\n or a lone \\r), read in chunks."""
    pending = b""
    for chunk in iter(lambda: handle.read(_READ_CHUNK), b""):
        data = pending + chunk
        # A chunk ending in \r may end in the first half of \r\n: keep that \r for the next round.
        cut = len(data) - 1 if data.endswith(b"\r") else len(data)
        *lines, pending = _NEWLINE.split(data[:cut])
        pending += data[cut:]
        yield from lines
    *lines, last = _NEWLINE.split(pending)
    yield from lines
    if last:
        yield last


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file, gzip-compressed when its name ends in .gz; a line that
    is not valid UTF-8 raises ValueError naming it."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(split_lines(handle), start=1):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})") \
                        from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: not a readable gzip file ({error})") from None


def _txt_rows(path: Path, name: str) -> Iterator[tuple[str, str]]:
    for number, line in text_lines(path):
        if line.strip():
            yield f"{name}:{number}", line


def _jsonl_rows(path: Path, name: str, field: str, id_column: str | None) -> Iterator[tuple[str, str]]:
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{number}: no field {field!r} (has {keys}); choose it with --field")
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number}: field {field!r} is {type(text).__name__}, not a string")
        if id_column is not None and id_column not in record:
            raise ValueError(f"{path}:{number}: no id field {id_column!r}")
        yield (f"{name}:{number}" if id_column is None else str(record[id_column])), text


def _parquet_rows(path: Path, name: str, column: str, id_column: str | None) -> Iterator[tuple[str, str]]:
    require_extra("embed", "reading .parquet input", "pyarrow")
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid for a damaged file
        raise ValueError(f"{path}: not a readable parquet file ({error})") from None
    names = handle.schema_arrow.names
    for wanted, flag in ((column, "--column"), (id_column, "--id-column")):
        if wanted is not None and wanted not in names:
            raise ValueError(f"{path}: no column {wanted!r} (has {names}); choose it with {flag}")
    columns = [column] + ([id_column] if id_column is not None else [])
    row = 0
    for batch in handle.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if id_column is not None else None
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {row + i}: column {column!r} holds {type(text).__name__}, "
                                 f"not a string")
            yield (f"{name}:{row + i}" if ids is None else str(ids[i])), text
        row += len(texts)
