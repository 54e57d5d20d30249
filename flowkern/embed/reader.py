"""Streaming input for the embedding job: .txt, .jsonl and .parquet files, a directory or a glob of them.

Rows are never loaded whole: files are read line by line (parquet: in record batches). Every row gets a stable id,
`<file>:<line>` (1-based line number; parquet: `<file>:<row>`, 0-based), or the value of an id column/field.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

SUFFIXES = (".txt", ".jsonl", ".parquet")
_PARQUET_BATCH = 8192


def input_files(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """(path, name used in row ids) of each input file, in a fixed order.

    An input is a file, a directory (its files with a known suffix, recursively, sorted) or a glob pattern."""
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise ValueError("no input given")
    files: list[tuple[Path, str]] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise ValueError(f"{path}: no {'/'.join(SUFFIXES)} files in this directory")
            files += [(p, p.relative_to(path).as_posix()) for p in found]
        elif path.is_file():
            files.append((path, path.name))
        elif any(ch in str(spec) for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise ValueError(f"{spec}: the pattern matches no file")
            files += [(p, p.name) for p in found]
        else:
            raise FileNotFoundError(f"{spec}: no such file or directory")
    for path, _ in files:
        if path.suffix not in SUFFIXES:
            raise ValueError(f"{path}: unknown input format {path.suffix or '(no suffix)'!r}; "
                             f"expected one of {', '.join(SUFFIXES)}")
    return files


def iter_rows(files: list[tuple[Path, str]], field: str = "text", column: str = "text",
              id_column: str | None = None) -> Iterator[tuple[str, str]]:
    """(id, text) for every row of every file, in order. Blank .txt lines are skipped (ids keep line numbers)."""
    for path, name in files:
        if path.suffix == ".txt":
            yield from _txt_rows(path, name)
        elif path.suffix == ".jsonl":
            yield from _jsonl_rows(path, name, field, id_column)
        else:
            yield from _parquet_rows(path, name, column, id_column)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _txt_rows(path: Path, name: str) -> Iterator[tuple[str, str]]:
    for number, line in _lines(path):
        if line.strip():
            yield f"{name}:{number}", line


def _jsonl_rows(path: Path, name: str, field: str, id_column: str | None) -> Iterator[tuple[str, str]]:
    for number, line in _lines(path):
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
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet input needs pyarrow: pip install pyarrow") from None
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
