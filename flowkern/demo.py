"""The BERT-flow demo (`flowkern demo`, `make demo`): on each STS task the pooled baseline, whitening and BERT-flow
(both fitted on the task's sentences); the fit time of the fast path against the eager (original) path; a histogram
of the cosine similarity of random sentence pairs before and after the flow. Writes results.json and anisotropy.png.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

from flowkern._extras import require_extra

require_extra("bertflow", "flowkern.demo", "numpy", "transformers", "matplotlib")

import numpy as np  # noqa: E402  (after the check, so a missing extra is named, not a missing numpy)
import torch  # noqa: E402

from flowkern.data import fit_sentences, load_task, task_spec  # noqa: E402
from flowkern.models import BertFlow, SentenceEncoder, Whitening, evaluate_pairs  # noqa: E402
from flowkern.models.evaluate import cosine_similarity, format_table, scores_json  # noqa: E402


def run_demo(tasks: Sequence[str], out_dir: str | os.PathLike, *, encoder: dict, flow: dict, fit: dict,
             seed: int = 0, data_dir: str | os.PathLike | None = None, max_pairs: int | None = None,
             eager_steps: int = 10, eager_full: bool = False, skip_eager: bool = False, random_pairs: int = 5000,
             progress: bool = False) -> dict:
    """Run the demo and return its report (also written to OUT_DIR/results.json, with the plot beside it).

    encoder: SentenceEncoder arguments (name_or_path, pooling, max_length, device, cache_dir); flow: the Glow
    config; fit: BertFlow.fit arguments (epochs, batch_size, lr, weight_decay, seed, encode_batch_size, progress).
    The eager path is timed on the first task's first `eager_steps` steps beside the fast path on the same batches,
    on its whole fit with eager_full, not at all with skip_eager.
    """
    if eager_steps < 1:
        raise ValueError(f"eager_steps must be positive, got {eager_steps}")
    tasks = list(tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Data first: a missing directory or file fails before the slow model loading and fitting.
    data = {task: (load_task(task, data_dir, max_pairs), fit_sentences(task, "target", data_dir, max_pairs))
            for task in tasks}
    _quiet_model_loading()
    sentence_encoder = SentenceEncoder(**encoder)
    encode_batch_size = fit.get("encode_batch_size", 128)

    def new_model() -> BertFlow:
        return BertFlow(sentence_encoder, flow=flow, seed=seed)

    # Timing first, while the embedding cache is cold, so the fast path pays for encoding its corpus.
    timing_task = tasks[0]
    pairs, corpus = data[timing_task]
    # The load average is recorded because other processes on a small CPU can distort these times.
    timing: dict = {"task": timing_task}
    fast_model = new_model()
    load_before = os.getloadavg()
    fast = fast_model.fit(corpus, **fit)
    timing["fast"] = _fit_summary(fast, evaluate_pairs(fast_model.encode, pairs).wmean, load_before)
    _log(f"{timing_task}: fast path fit {fast.total_seconds:.1f}s")
    if eager_full:
        eager_model = new_model()
        load_before = os.getloadavg()
        eager = eager_model.fit(corpus, reference=True, **fit)
        timing["eager_steps"] = "all"
        timing["eager"] = _fit_summary(eager, evaluate_pairs(eager_model.encode, pairs).wmean, load_before)
        timing["eager_over_fast"] = eager.total_seconds / fast.total_seconds
        _log(f"{timing_task}: eager path fit {eager.total_seconds:.1f}s "
             f"(eager/fast time ratio {timing['eager_over_fast']:.1f})")
    elif not skip_eager:
        # The same first N batches (same seed, same shuffle) on both paths, each a fresh model timed by fit() alike;
        # the fast path's embeddings are cached by its full fit above, the eager path encodes every batch.
        n = min(eager_steps, fast.steps)
        load_before = os.getloadavg()
        eager = new_model().fit(corpus, reference=True, max_steps=n, **fit)
        timing["eager"] = _fit_summary(eager, load_before=load_before)
        load_before = os.getloadavg()
        fast_n = new_model().fit(corpus, max_steps=n, **fit)
        timing["fast_same_steps"] = _fit_summary(fast_n, load_before=load_before)
        timing["eager_steps"] = n
        timing["eager_over_fast"] = eager.total_seconds / fast_n.total_seconds
        _log(f"{timing_task}: first {n} steps: eager path {eager.total_seconds:.1f}s, fast path "
             f"{fast_n.total_seconds:.2f}s (eager/fast time ratio {timing['eager_over_fast']:.1f})")

    results: dict[str, dict] = {"pooled": {}, "whitening (target)": {}, "flow (target)": {}}
    fits = {}
    for task in tasks:
        pairs, corpus = data[task]
        whitening = Whitening().fit(sentence_encoder.encode(corpus, encode_batch_size, progress))
        if task == timing_task:
            model, fits[task] = fast_model, fast
        else:
            model = new_model()
            fits[task] = model.fit(corpus, **fit)
        results["pooled"][task] = evaluate_pairs(sentence_encoder.encode, pairs, task)
        results["whitening (target)"][task] = evaluate_pairs(
            lambda sentences: whitening.transform(sentence_encoder.encode(sentences)), pairs, task)
        results["flow (target)"][task] = evaluate_pairs(model.encode, pairs, task)
        _log(f"{task}: " + ", ".join(f"{method} {scores[task].wmean:.2f}" for method, scores in results.items()))
    anisotropy = plot_anisotropy(fast_model, data[timing_task][1], random_pairs, seed, out_dir / "anisotropy.png",
                                 timing_task)

    table = format_table(results)
    print(table)
    print(format_timing(timing))
    report = {
        "config": {"encoder": sentence_encoder.name, "pooling": sentence_encoder.pooling,
                   "max_length": sentence_encoder.max_length, "flow": fast_model.flow.config,
                   **{key: fit.get(key) for key in ("epochs", "batch_size", "lr", "weight_decay")}, "seed": seed,
                   "max_pairs": max_pairs, "tasks": tasks},
        "scores": scores_json(results),
        "fit": {task: _fit_summary(report) for task, report in fits.items()},
        "timing": timing,
        "anisotropy": anisotropy,
        "machine": {"device": str(sentence_encoder.device), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "total_seconds": time.perf_counter() - started,
        "table": table,
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'anisotropy.png'} "
          f"({report['total_seconds']:.0f}s in all)")
    return report


def _quiet_model_loading() -> None:
    """Hide transformers' weight-loading progress bar (one per from_pretrained call)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _fit_summary(report, spearman: float | None = None, load_before: tuple | None = None) -> dict:
    summary = {k: v for k, v in report.to_dict().items() if k != "losses"}
    summary["first_loss"], summary["final_loss"] = report.losses[0], report.final_loss
    if spearman is not None:
        summary["spearman"] = spearman
    if load_before is not None:
        summary["load_average_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
    return summary


def plot_anisotropy(model: BertFlow, corpus: Sequence[str], n_pairs: int, seed: int, path: Path, task: str) -> dict:
    """Histogram of cosine similarity of random distinct-sentence pairs, before vs after the flow, saved at `path`;
    returns the means and standard deviations it plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    distinct = list(dict.fromkeys(corpus))
    if len(distinct) < 2:
        raise ValueError(f"{task}: the anisotropy plot needs at least 2 distinct sentences, got {len(distinct)}")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(distinct), n_pairs)
    second = (first + rng.integers(1, len(distinct), n_pairs)) % len(distinct)  # never the same sentence
    pooled = model.pooled(distinct).cpu().numpy()
    latent = model.transform(pooled)
    before = cosine_similarity(pooled[first], pooled[second])
    after = cosine_similarity(latent[first], latent[second])
    figure, axes = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-1.0, 1.0, 81)
    axes.hist(before, bins=bins, alpha=0.6, label=f"pooled (mean {before.mean():.2f})")
    axes.hist(after, bins=bins, alpha=0.6, label=f"after flow (mean {after.mean():.2f})")
    axes.set_xlabel("cosine similarity of a random sentence pair")
    axes.set_ylabel("pairs")
    axes.set_title(f"{task_spec(task).title} sentences: {n_pairs} random pairs")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return {"task": task, "pairs": n_pairs, "mean_cosine_before": float(before.mean()),
            "mean_cosine_after": float(after.mean()), "std_cosine_before": float(before.std()),
            "std_cosine_after": float(after.std()), "plot": path.name}


def format_timing(timing: dict) -> str:
    """The report's "timing" entry as the lines the demo prints."""
    fast = timing["fast"]
    lines = [f"fit on {timing['task']} ({fast['n_sentences']} sentences, {fast['n_distinct']} distinct): "
             f"fast path {fast['total_seconds']:.1f}s (encode {fast['encode_seconds']:.1f}s), "
             f"Spearman {fast['spearman']:.2f}"]
    indent = " " * len("fit on ")
    if timing.get("eager_steps") == "all":
        eager = timing["eager"]
        lines.append(f"{indent}eager path {eager['total_seconds']:.1f}s, Spearman "
                     f"{eager['spearman']:.2f}: eager/fast time ratio {timing['eager_over_fast']:.1f}")
    elif "eager" in timing:
        eager, fast_n, n = timing["eager"], timing["fast_same_steps"], timing["eager_steps"]
        lines += [f"{indent}first {n} steps (same batches), eager path: {eager['total_seconds']:.1f}s for {n} steps, "
                  f"{eager['total_seconds'] / n:.3f}s per step (encoding every batch: {eager['encode_seconds']:.1f}s)",
                  f"{indent}first {n} steps (same batches), fast path: {fast_n['total_seconds']:.2f}s for {n} steps, "
                  f"{fast_n['total_seconds'] / n:.4f}s per step (embeddings cached by the fit above)",
                  f"{indent}eager/fast time ratio on these {n} steps {timing['eager_over_fast']:.1f} "
                  f"(the whole eager fit: --eager-full)"]
    return "\n".join(lines)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
