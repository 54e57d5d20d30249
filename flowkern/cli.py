"""Command line: ``flowkern fit | encode | eval | demo`` (also ``python -m flowkern``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from flowkern._extras import require_extra

require_extra("bertflow", "the flowkern command", "numpy", "transformers")

import numpy as np  # noqa: E402  (after the check, so a missing extra is named, not a missing numpy)
import torch

from flowkern.data import SETTINGS, TASKS, DataDirError, fit_sentences, load_task, task_spec
from flowkern.embed.job import DEFAULT_SHARD_ROWS

TASK_NAMES = tuple(TASKS)

TEXT_FILE_HELP = ("one sentence per line, UTF-8; blank lines are skipped; a line that is not valid UTF-8 "
                  "stops the command with its line number")


class CliError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def read_sentences(path: str | os.PathLike) -> list[str]:
    """Sentences of a text file, one per line: strict UTF-8 (invalid bytes raise with the line number),
    line endings (\\n, \\r\\n or a lone \\r) removed, blank lines skipped, other whitespace kept."""
    from flowkern.embed.reader import split_lines

    path = Path(path)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    sentences = []
    with open(path, "rb") as handle:
        raw_lines = list(split_lines(handle))
    for line_number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CliError(f"{path}:{line_number}: not valid UTF-8 (byte {error.start} of the line); "
                           f"re-encode the file as UTF-8") from None
        if line.strip():
            sentences.append(line)
    if not sentences:
        raise CliError(f"{path}: empty corpus (no non-blank lines)")
    return sentences


# ---------------------------------------------------------------------------------------------- arguments

def _add_encoder_args(parser: argparse.ArgumentParser) -> None:
    from flowkern.models.encoder import DEFAULT_MAX_LENGTH, DEFAULT_POOLING, POOLINGS

    group = parser.add_argument_group("encoder")
    group.add_argument("--encoder", default=None,
                       help="HuggingFace model name or local directory (default: the embedded all-MiniLM-L6-v2)")
    group.add_argument("--pooling", default=DEFAULT_POOLING,
                       help=f"one of {', '.join(POOLINGS)} (default: %(default)s, the original code's behaviour)")
    group.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per sentence (%(default)s)")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--cache-dir", default=None, help="also cache pooled embeddings on disk here")
    group.add_argument("--batch-size-encode", type=int, default=128, help="sentences per encoder batch (%(default)s)")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("STS data")
    group.add_argument("--data-dir", default=None, help="STS data directory (default: $FLOWKERN_DATA)")
    group.add_argument("--max-pairs", type=int, default=None,
                       help="use a seeded random subset of at most this many pairs from each STS file (quick runs)")


def _add_fit_args(parser: argparse.ArgumentParser) -> None:
    from flowkern.nn.glow import COUPLINGS
    from flowkern.nn.invconv import MIXINGS

    group = parser.add_argument_group("flow and training")
    group.add_argument("--levels", type=int, default=3, help="Glow levels (%(default)s)")
    group.add_argument("--depth", type=int, default=3, help="flow steps per level (%(default)s)")
    group.add_argument("--hidden", type=int, default=32, help="coupling network width (%(default)s)")
    group.add_argument("--coupling", choices=tuple(COUPLINGS), default="additive")
    group.add_argument("--mixing", choices=MIXINGS, default="reverse",
                       help="channel mixing between couplings (default: fixed reversal, as the original code)")
    group.add_argument("--epochs", type=int, default=1)
    group.add_argument("--batch-size", type=int, default=64, help="sentences per flow step (%(default)s)")
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--seed", type=int, default=0)


def _add_tasks_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=",".join(TASK_NAMES),
                        help="comma-separated STS tasks (default: all: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowkern", description="BERT-flow sentence embeddings and STS evaluation.")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser("fit", help="fit a flow on sentences and save the model directory",
                              description="Fit a BERT-flow model on unlabelled sentences and save it.")
    source = fit.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help=f"text file of sentences ({TEXT_FILE_HELP})")
    source.add_argument("--task", choices=TASK_NAMES, help="fit on an STS task's sentences (labels unused)")
    fit.add_argument("--setting", choices=SETTINGS, default="target",
                     help="with --task: target = the task's own sentences (STS-B: train+dev+test), "
                          "train = STS-B train sentences")
    fit.add_argument("--out", required=True, help="model directory to write")
    fit.add_argument("--bundle", action="store_true",
                     help="copy the encoder into OUT/encoder/ so that the model directory is self-contained")
    fit.add_argument("--reference", action="store_true",
                     help="eager path: the original recipe (encoder re-run every batch, dropout on, torch backend)")
    _add_encoder_args(fit)
    _add_fit_args(fit)
    _add_data_args(fit)

    encode = commands.add_parser("encode", help="embed a text file with a saved model into a .npy file",
                                 description="Embed sentences with a saved model; writes float32 [N, D] .npy.")
    encode.add_argument("model", help="model directory written by `flowkern fit`")
    encode.add_argument("input", help=f"text file ({TEXT_FILE_HELP})")
    encode.add_argument("output", help=".npy file to write")
    encode.add_argument("--pooled", action="store_true", help="write the encoder's pooled embeddings (no flow)")
    encode.add_argument("--batch-size", type=int, default=128)
    encode.add_argument("--device", default=None)

    embed = commands.add_parser(
        "embed", help="embed a large corpus with a saved model into sharded, resumable output",
        description="Embed every row of INPUT (.txt lines, .jsonl --field, .parquet --column; a file, directory or "
                    "glob) with a saved model, streaming, into shards of OUT (read them with "
                    "flowkern.embed.read_output). --resume finishes an interrupted run exactly.")
    embed.add_argument("input", nargs="+", help="input file(s), directory or glob")
    embed.add_argument("--model", required=True, help="model directory written by `flowkern fit`")
    embed.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    embed.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="rows per output shard")
    embed.add_argument("--format", choices=("npy", "parquet"), default="npy",
                       help="npy: shard-K.npy + shard-K.ids.npy; parquet: shard-K.parquet (id, embedding)")
    embed.add_argument("--field", default="text", help="the text field of .jsonl input")
    embed.add_argument("--column", default="text", help="the text column of .parquet input")
    embed.add_argument("--id-column", default=None, help="take row ids from this field/column (default file:line)")
    embed.add_argument("--pooled", action="store_true", help="write the encoder's pooled vectors (no flow)")
    embed.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="output dtype")
    embed.add_argument("--resume", action="store_true",
                       help="keep the shards a previous run of this job finished (checked against their done "
                            "markers and the input), redo the rest")
    embed.add_argument("--overwrite", action="store_true", help="replace another job's output in OUT")
    embed.add_argument("--batch-tokens", type=int, default=None,
                       help="padded tokens per encoder batch (length-sorted batches; default 16384 on GPU, 2048 on "
                            "CPU); part of the job's identity, as it changes the embeddings' last bits")
    embed.add_argument("--devices", default=None,
                       help="comma-separated devices, one worker process each (e.g. cuda:0,cuda:1); default: "
                            "every visible GPU, else this process on the CPU")

    evaluate = commands.add_parser("eval", help="Spearman x 100 on STS tasks for a model or a baseline",
                                   description="Evaluate a saved model, or a baseline on the encoder, on STS tasks.")
    which = evaluate.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model directory written by `flowkern fit` (its encoder, pooling and "
                                       "max length are used; --encoder/--pooling/--max-length are ignored)")
    which.add_argument("--baseline", choices=("pooled", "whitening"),
                       help="pooled: the encoder's pooled embeddings; whitening: fitted per task (see --setting)")
    evaluate.add_argument("--setting", choices=SETTINGS, default="target", help="whitening's fit corpus")
    evaluate.add_argument("--whitening-dim", type=int, default=None, help="keep k whitened dimensions (default: all)")
    evaluate.add_argument("--json", help="also write the scores as JSON here")
    _add_tasks_arg(evaluate)
    _add_encoder_args(evaluate)
    _add_data_args(evaluate)

    # `flowkern bench ARGS` goes straight to flowkern.bench (its own parser, shared with bench/gpu_check.sh);
    # listed here for --help.
    commands.add_parser("bench", help="time every backend on this device (flowkern bench --help for options)",
                        add_help=False)
    demo = commands.add_parser(
        "demo", help="baseline vs whitening vs flow on the STS tasks, fast vs eager fit time, anisotropy plot",
        description="On each task: pooled baseline, whitening and BERT-flow (both fitted on the task's sentences); "
                    "fit time of the fast path vs the eager (original) path on the first task's first "
                    "--eager-steps steps (the whole fit with --eager-full); a histogram of "
                    "cosine similarities of random sentence pairs before and after the flow.")
    demo.add_argument("--out-dir", default="flowkern-demo", help="where results.json and anisotropy.png go")
    demo.add_argument("--eager-steps", type=int, default=10,
                      help="time the eager path on the first N steps of the first task, and the fast path on the "
                           "same N steps (embeddings cached by its full fit) (%(default)s)")
    demo.add_argument("--eager-full", action="store_true",
                      help="time the whole eager-path fit instead (about 10 minutes for STS-B on 2 CPU cores)")
    demo.add_argument("--skip-eager", action="store_true", help="no eager-path timing at all")
    demo.add_argument("--random-pairs", type=int, default=5000, help="random sentence pairs in the plot")
    _add_tasks_arg(demo)
    _add_encoder_args(demo)
    _add_fit_args(demo)
    _add_data_args(demo)
    return parser


# ---------------------------------------------------------------------------------------------- commands

def _flow_config(args: argparse.Namespace) -> dict:
    return dict(levels=args.levels, depth=args.depth, hidden=args.hidden, coupling=args.coupling, mixing=args.mixing)


def _fit_kwargs(args: argparse.Namespace, progress: bool) -> dict:
    return dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                seed=args.seed, encode_batch_size=args.batch_size_encode, progress=progress)


def _quiet_model_loading() -> None:
    """Hide transformers' weight-loading progress bar (one per from_pretrained call)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _encoder(args: argparse.Namespace):
    from flowkern.models import SentenceEncoder

    _quiet_model_loading()
    return SentenceEncoder(args.encoder, args.pooling, args.max_length, args.device, args.cache_dir)


def _load_model(args: argparse.Namespace):
    from flowkern.models import BertFlow

    _quiet_model_loading()
    return BertFlow.load(args.model, device=args.device, cache_dir=getattr(args, "cache_dir", None))


def _tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown or not tasks:
        raise CliError(f"unknown or no tasks {unknown or spec!r}; choose from {', '.join(TASK_NAMES)}")
    return tasks


def run_fit(args: argparse.Namespace, progress: bool) -> None:
    from flowkern.models import BertFlow

    if args.text:
        sentences = read_sentences(args.text)
    else:
        sentences = fit_sentences(args.task, args.setting, args.data_dir, args.max_pairs)
    model = BertFlow(_encoder(args), flow=_flow_config(args), seed=args.seed)
    report = model.fit(sentences, reference=args.reference, **_fit_kwargs(args, progress))
    model.save(args.out, bundle=args.bundle)
    print(f"fitted on {report.n_sentences} sentences ({report.n_distinct} distinct), {report.steps} steps, "
          f"{report.path} path, {report.total_seconds:.1f}s, final loss {report.final_loss:.4f} bits/dim; "
          f"saved to {args.out}")


def run_encode(args: argparse.Namespace, progress: bool) -> None:
    sentences = read_sentences(args.input)
    model = _load_model(args)
    if args.pooled:
        embeddings = model.pooled(sentences, args.batch_size, progress).cpu().numpy()
    else:
        embeddings = model.encode(sentences, args.batch_size, progress=progress)
    # np.save appends .npy to any other name: report the file it really writes.
    output = Path(args.output)
    if output.suffix != ".npy":
        output = output.with_name(output.name + ".npy")
    np.save(output, embeddings.astype(np.float32))
    print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} float32 embeddings to {output}")


def run_embed(args: argparse.Namespace, progress: bool) -> None:
    from flowkern.embed import embed

    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    else:
        count = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(count)] if count > 1 else None
    report = embed(args.input, args.model, args.out, shard_rows=args.shard_rows, format=args.format,
                   field=args.field, column=args.column, id_column=args.id_column, pooled=args.pooled,
                   dtype=args.dtype, resume=args.resume, overwrite=args.overwrite, batch_tokens=args.batch_tokens,
                   devices=devices, progress=progress)
    redone = f", {report.shards_redone} damaged or foreign shards redone" if report.shards_redone else ""
    print(f"embedded {report.rows} sentences into {report.shards} shards of {report.out_dir} "
          f"({report.shards_skipped} shards already done{redone}) in {report.seconds:.1f} s: "
          f"{report.rows_per_second:.0f} sentences/s")


def run_eval(args: argparse.Namespace, progress: bool) -> None:
    from flowkern.models import Whitening, evaluate_pairs

    tasks = _tasks(args.tasks)
    # Data first: a missing directory or file fails before the slow model loading.
    pairs = {task: load_task(task, args.data_dir, args.max_pairs) for task in tasks}
    if args.model:
        model = _load_model(args)
        method = f"flow ({args.model})"

        def embed(sentences: Sequence[str]):
            return model.encode(sentences, args.batch_size_encode)

        scores = {task: evaluate_pairs(embed, pairs[task], task) for task in tasks}
    else:
        encoder = _encoder(args)
        method = args.baseline if args.baseline == "pooled" else f"whitening ({args.setting})"

        def encode(sentences: Sequence[str]):
            return encoder.encode(sentences, args.batch_size_encode, progress)

        scores = {}
        for task in tasks:
            embed = encode
            if args.baseline == "whitening":
                corpus = fit_sentences(task, args.setting, args.data_dir, args.max_pairs)
                embed = _whitened(encode, Whitening(args.whitening_dim).fit(encode(corpus)))
            scores[task] = evaluate_pairs(embed, pairs[task], task)
    results = {method: scores}
    print(format_table(results))
    if args.json:
        _write_json(args.json, {"scores": _scores_json(results)})


def _whitened(encode: Callable, whitening) -> Callable:
    return lambda sentences: whitening.transform(encode(sentences))


# ---------------------------------------------------------------------------------------------- demo

def run_demo(args: argparse.Namespace, progress: bool) -> None:
    import torch

    from flowkern.models import BertFlow, Whitening, evaluate_pairs

    tasks = _tasks(args.tasks)
    if args.eager_steps < 1:
        raise CliError(f"--eager-steps must be positive, got {args.eager_steps} (--skip-eager for no eager timing)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Data first: a missing directory or file fails before the slow model loading and fitting.
    data = {task: (load_task(task, args.data_dir, args.max_pairs),
                   fit_sentences(task, "target", args.data_dir, args.max_pairs)) for task in tasks}
    encoder = _encoder(args)
    fit_kwargs = _fit_kwargs(args, progress)

    def new_model() -> BertFlow:
        return BertFlow(encoder, flow=_flow_config(args), seed=args.seed)

    # Timing first, while the embedding cache is cold, so the fast path pays for encoding its corpus.
    timing_task = tasks[0]
    pairs, corpus = data[timing_task]
    # The load average is recorded because other processes on a small CPU can distort these times.
    timing: dict = {"task": timing_task}
    fast_model = new_model()
    load_before = os.getloadavg()
    fast = fast_model.fit(corpus, **fit_kwargs)
    timing["fast"] = _fit_summary(fast, evaluate_pairs(fast_model.encode, pairs).wmean, load_before)
    _log(f"{timing_task}: fast path fit {fast.total_seconds:.1f}s")
    if args.eager_full:
        eager_model = new_model()
        load_before = os.getloadavg()
        eager = eager_model.fit(corpus, reference=True, **fit_kwargs)
        timing["eager_steps"] = "all"
        timing["eager"] = _fit_summary(eager, evaluate_pairs(eager_model.encode, pairs).wmean, load_before)
        timing["eager_over_fast"] = eager.total_seconds / fast.total_seconds
        _log(f"{timing_task}: eager path fit {eager.total_seconds:.1f}s "
             f"(eager/fast time ratio {timing['eager_over_fast']:.1f})")
    elif not args.skip_eager:
        # The same first N batches (same seed, same shuffle) on both paths, each a fresh model timed by fit() alike;
        # the fast path's embeddings are cached by its full fit above, the eager path encodes every batch.
        n = min(args.eager_steps, fast.steps)
        load_before = os.getloadavg()
        eager = new_model().fit(corpus, reference=True, max_steps=n, **fit_kwargs)
        timing["eager"] = _fit_summary(eager, load_before=load_before)
        load_before = os.getloadavg()
        fast_n = new_model().fit(corpus, max_steps=n, **fit_kwargs)
        timing["fast_same_steps"] = _fit_summary(fast_n, load_before=load_before)
        timing["eager_steps"] = n
        timing["eager_over_fast"] = eager.total_seconds / fast_n.total_seconds
        _log(f"{timing_task}: first {n} steps: eager path {eager.total_seconds:.1f}s, fast path "
             f"{fast_n.total_seconds:.2f}s (eager/fast time ratio {timing['eager_over_fast']:.1f})")

    results: dict[str, dict] = {"pooled": {}, "whitening (target)": {}, "flow (target)": {}}
    fits = {}
    for task in tasks:
        pairs, corpus = data[task]
        whitening = Whitening().fit(encoder.encode(corpus, args.batch_size_encode, progress))
        if task == timing_task:
            model, fits[task] = fast_model, fast
        else:
            model = new_model()
            fits[task] = model.fit(corpus, **fit_kwargs)
        results["pooled"][task] = evaluate_pairs(encoder.encode, pairs, task)
        results["whitening (target)"][task] = evaluate_pairs(_whitened(encoder.encode, whitening), pairs, task)
        results["flow (target)"][task] = evaluate_pairs(model.encode, pairs, task)
        _log(f"{task}: " + ", ".join(f"{method} {scores[task].wmean:.2f}" for method, scores in results.items()))
    anisotropy = _plot_anisotropy(fast_model, data[timing_task][1], args.random_pairs, args.seed,
                                  out_dir / "anisotropy.png", timing_task)

    table = format_table(results)
    print(table)
    print(_format_timing(timing))
    report = {
        "config": {"encoder": encoder.name, "pooling": encoder.pooling, "max_length": encoder.max_length,
                   "flow": fast_model.flow.config, "epochs": args.epochs, "batch_size": args.batch_size,
                   "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
                   "max_pairs": args.max_pairs, "tasks": tasks},
        "scores": _scores_json(results),
        "fit": {task: _fit_summary(report) for task, report in fits.items()},
        "timing": timing,
        "anisotropy": anisotropy,
        "machine": {"device": str(encoder.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "total_seconds": time.perf_counter() - started,
        "table": table,
    }
    _write_json(out_dir / "results.json", report)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'anisotropy.png'} "
          f"({report['total_seconds']:.0f}s in all)")


def _fit_summary(report, spearman: float | None = None, load_before: tuple | None = None) -> dict:
    summary = {k: v for k, v in report.to_dict().items() if k != "losses"}
    summary["first_loss"], summary["final_loss"] = report.losses[0], report.final_loss
    if spearman is not None:
        summary["spearman"] = spearman
    if load_before is not None:
        summary["load_average_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
    return summary


def _plot_anisotropy(model, corpus: Sequence[str], n_pairs: int, seed: int, path: Path, task: str) -> dict:
    """Histogram of cosine similarity of random distinct-sentence pairs, before vs after the flow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowkern.models.evaluate import cosine_similarity

    distinct = list(dict.fromkeys(corpus))
    if len(distinct) < 2:
        raise CliError(f"{task}: the anisotropy plot needs at least 2 distinct sentences, got {len(distinct)}")
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


# ---------------------------------------------------------------------------------------------- output

def format_table(results: dict[str, dict]) -> str:
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


def _format_timing(timing: dict) -> str:
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


def _scores_json(results: dict[str, dict]) -> dict:
    return {method: {task: score.to_dict() for task, score in scores.items()} for method, scores in results.items()}


def _write_json(path: str | os.PathLike, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n", encoding="utf-8")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- entry point

COMMANDS = {"fit": run_fit, "encode": run_encode, "embed": run_embed, "eval": run_eval, "demo": run_demo}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "bench" in argv and all(arg.startswith("-") for arg in argv[:argv.index("bench")]):
        from . import bench

        return bench.main(argv[argv.index("bench") + 1:])
    args = build_parser().parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar of every from_pretrained call

    try:
        COMMANDS[args.command](args, progress)
    except (CliError, DataDirError, OSError, ValueError, FloatingPointError, ImportError) as error:  # OSError: files
        print(f"flowkern {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0
