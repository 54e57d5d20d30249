"""STS evaluation data: locating the data directory, reading the TSV files, the task registry.

File format (see the data directory's SOURCES.md): gzip-compressed UTF-8 TSV with one header line,
columns ``score sentence1 sentence2 [subset]``, no quoting. Lines are split on tabs only, because
sentences contain ``"`` characters that a quoting CSV reader would misparse.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_ENV_VAR = "FLOWKERN_DATA"

SETTINGS = ("target", "train")


class DataDirError(FileNotFoundError):
    """The STS data directory (or one of its files) cannot be found."""


def _how_to_set() -> str:
    return (
        f"pass the directory with --data-dir (or data_dir=...), or set the {DATA_ENV_VAR} environment "
        f"variable to the directory holding stsb-test.tsv.gz and the other STS files"
    )


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The STS data directory: the explicit argument, else $FLOWKERN_DATA; raises DataDirError if unusable."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV_VAR) or None
        origin = f"${DATA_ENV_VAR}"
    else:
        origin = "the given data directory"
    if data_dir is None:
        raise DataDirError(f"no STS data directory given: {_how_to_set()}")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataDirError(f"{origin} {str(path)!r} is not a directory: {_how_to_set()}")
    return path


@dataclass(frozen=True)
class StsPairs:
    """Gold-scored sentence pairs; ``subsets`` names each pair's SemEval sub-dataset (None if the file has none)."""

    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray
    subsets: list[str] | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def sentences(self) -> list[str]:
        """Both sentences of every pair, pair by pair (duplicates kept, as the original fits on them)."""
        return [s for pair in zip(self.sentences1, self.sentences2) for s in pair]

    def select(self, indices: np.ndarray) -> StsPairs:
        return StsPairs(
            [self.sentences1[i] for i in indices],
            [self.sentences2[i] for i in indices],
            self.scores[indices],
            None if self.subsets is None else [self.subsets[i] for i in indices],
        )


def read_pairs(path: str | os.PathLike, max_pairs: int | None = None, seed: int = 0) -> StsPairs:
    """Read one STS file; with ``max_pairs``, a seeded random subset of that many pairs in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataDirError(f"STS data file {str(path)!r} not found: {_how_to_set()}")
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:3] != ["score", "sentence1", "sentence2"]:
            raise ValueError(f"{path}: unexpected header {header!r}")
        has_subset = len(header) > 3 and header[3] == "subset"
        sentences1, sentences2, scores, subsets = [], [], [], []
        for line_number, line in enumerate(f, start=2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != len(header):
                raise ValueError(f"{path}:{line_number}: expected {len(header)} tab-separated fields, "
                                 f"got {len(fields)}")
            scores.append(float(fields[0]))
            sentences1.append(fields[1])
            sentences2.append(fields[2])
            if has_subset:
                subsets.append(fields[3])
    pairs = StsPairs(sentences1, sentences2, np.asarray(scores, dtype=np.float64), subsets if has_subset else None)
    if max_pairs is not None and max_pairs < len(pairs):
        chosen = np.sort(np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False))
        pairs = pairs.select(chosen)
    return pairs


@dataclass(frozen=True)
class TaskSpec:
    """Which files a task is evaluated on and which files its "target" corpus comes from."""

    name: str
    title: str
    eval_file: str
    target_files: tuple[str, ...]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("stsb", "STS-B", "stsb-test.tsv.gz", ("stsb-train.tsv.gz", "stsb-dev.tsv.gz", "stsb-test.tsv.gz")),
        # As for STS-B, the target corpus is the whole dataset (train + dev + test sentences, labels unused).
        TaskSpec("sickr", "SICK-R", "sickr-test.tsv.gz",
                 ("sickr-train.tsv.gz", "sickr-dev.tsv.gz", "sickr-test.tsv.gz")),
        *(TaskSpec(f"sts{year}", f"STS{year}", f"sts{year}.tsv.gz", (f"sts{year}.tsv.gz",)) for year in range(12, 17)),
    )
}

TRAIN_FILES = ("stsb-train.tsv.gz",)


def task_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown STS task {name!r}; known tasks: {', '.join(TASKS)}") from None


def load_task(name: str, data_dir: str | os.PathLike | None = None, max_pairs: int | None = None,
              seed: int = 0) -> StsPairs:
    """The evaluation pairs of a task (STS-B and SICK-R: their test split; STS12-16: every pair)."""
    return read_pairs(resolve_data_dir(data_dir) / task_spec(name).eval_file, max_pairs, seed)


def fit_sentences(name: str, setting: str = "target", data_dir: str | os.PathLike | None = None,
                  max_pairs: int | None = None, seed: int = 0) -> list[str]:
    """Unlabelled sentences to fit a flow or whitening on.

    "target": the task's own sentences (STS-B and SICK-R: train+dev+test; STS12-16: that
    year's file). "train": STS-B train sentences whatever the task. ``max_pairs`` caps each file read,
    with the same seeded subset :func:`load_task` draws, so a capped target corpus covers the capped task.
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    root = resolve_data_dir(data_dir)
    files = task_spec(name).target_files if setting == "target" else TRAIN_FILES
    return [s for file in files for s in read_pairs(root / file, max_pairs, seed).sentences()]
