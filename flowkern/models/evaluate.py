"""STS evaluation: Spearman x 100 between the cosine similarity of each pair's embeddings and the gold score."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from flowkern.data import StsPairs, load_task, task_spec

Embedder = Callable[[Sequence[str]], "np.ndarray | torch.Tensor"]


def cosine_similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays, computed in float64."""
    a, b = (np.asarray(x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x, np.float64)
            for x in (a, b))
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def spearman_cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, gold: np.ndarray) -> float:
    """Spearman rank correlation x 100 of cosine(a_i, b_i) against gold_i."""
    if len(gold) < 2:
        raise ValueError("Spearman correlation needs at least two pairs")
    return float(spearmanr(cosine_similarity(a, b), gold).statistic * 100.0)


@dataclass
class TaskScore:
    """Spearman x 100 over all pairs ("all"), size-weighted mean over sub-datasets ("wmean"), per subset."""

    task: str
    all: float
    wmean: float
    n_pairs: int
    subsets: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_pairs(embed: Embedder, pairs: StsPairs, task: str = "") -> TaskScore:
    """Score ``embed`` (sentences -> [N, D]) on gold pairs; each sentence list is embedded in one call."""
    n = len(pairs)
    embeddings = embed(list(pairs.sentences1) + list(pairs.sentences2))
    first, second = embeddings[:n], embeddings[n:]
    overall = spearman_cosine(first, second, pairs.scores)
    if pairs.subsets is None:
        return TaskScore(task, overall, overall, n)
    names = np.asarray(pairs.subsets)
    per_subset, sizes = {}, {}
    for name in dict.fromkeys(pairs.subsets):
        rows = np.flatnonzero(names == name)
        sizes[name] = len(rows)
        # A subset cut down to one pair (by max_pairs) has no correlation; it is left out of wmean.
        per_subset[name] = (spearman_cosine(first[rows], second[rows], pairs.scores[rows]) if len(rows) > 1
                            else float("nan"))
    scored = [name for name in per_subset if np.isfinite(per_subset[name])]
    wmean = sum(per_subset[s] * sizes[s] for s in scored) / sum(sizes[s] for s in scored) if scored else float("nan")
    return TaskScore(task, overall, float(wmean), n, per_subset)


def evaluate(embed: Embedder, tasks: Sequence[str], data_dir: str | os.PathLike | None = None,
             max_pairs: int | None = None, seed: int = 0) -> dict[str, TaskScore]:
    """Score ``embed`` on each named STS task (see flowkern.data.TASKS)."""
    return {task: evaluate_pairs(embed, load_task(task, data_dir, max_pairs, seed), task) for task in tasks}


def format_table(results: dict[str, dict[str, TaskScore]]) -> str:
    """Methods x tasks, Spearman x 100, with the mean over tasks. STS12-16 use "wmean" (size-weighted
    mean over sub-datasets, as in the paper); a second block gives their "all" (pairs concatenated)."""

    tasks = list(dict.fromkeys(t for scores in results.values() for t in scores))
    with_subsets = [t for t in tasks if any(t in s and s[t].subsets for s in results.values())]
    headings = ("Spearman x 100", "all: concatenated")
    width = max(map(len, [*results, *headings])) + 2

    def block(heading: str, columns: list[str], aggregate: str, mean: bool) -> list[str]:
        lines = [f"{heading:<{width}}" + "".join(f"{task_spec(t).title:>8}" for t in columns)
                 + (f"{'avg':>8}" if mean else "")]
        for method, scores in results.items():
            values = [getattr(scores[t], aggregate) if t in scores else float("nan") for t in columns]
            lines.append(f"{method:<{width}}" + "".join(f"{v:8.2f}" for v in values)
                         + (f"{np.nanmean(values):8.2f}" if mean else ""))
        return lines

    lines = block(headings[0], tasks, "wmean", mean=True)
    if with_subsets:
        lines += ["(STS12-16: wmean over sub-datasets)", *block(headings[1], with_subsets, "all", mean=False)]
    return "\n".join(lines)


def scores_json(results: dict[str, dict[str, TaskScore]]) -> dict:
    """Methods x tasks as plain dicts, for a JSON report."""
    return {method: {task: score.to_dict() for task, score in scores.items()} for method, scores in results.items()}
