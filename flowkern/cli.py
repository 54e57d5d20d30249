"""Command line: ``flowkern fit | encode | embed | eval | demo | bench`` (also ``python -m flowkern``).

Parses the arguments and calls the library: flowkern.models for fit, encode and eval, flowkern.embed for embed,
flowkern.demo for the demo, flowkern.bench (its own parser) for bench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from flowkern._extras import require_extra

require_extra("bertflow", "the flowkern command", "numpy", "transformers")

import numpy as np  # noqa: E402  (after the check, so a missing extra is named, not a missing numpy)
import torch

from flowkern.data import SETTINGS, TASKS, DataDirError, fit_sentences, load_task
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
    embed.add_argument("--quantize", choices=("int8",), default=None,
                       help="int8: the encoder's linear layers dynamically quantized (CPU only; faster, slightly "
                            "different embeddings, see the README's measured results)")
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
                   devices=devices, quantize=args.quantize, progress=progress)
    redone = f", {report.shards_redone} damaged or foreign shards redone" if report.shards_redone else ""
    print(f"embedded {report.rows} sentences into {report.shards} shards of {report.out_dir} "
          f"({report.shards_skipped} shards already done{redone}) in {report.seconds:.1f} s: "
          f"{report.rows_per_second:.0f} sentences/s")


def run_eval(args: argparse.Namespace, progress: bool) -> None:
    from flowkern.models import Whitening, evaluate_pairs
    from flowkern.models.evaluate import format_table, scores_json

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
                whitening = Whitening(args.whitening_dim).fit(encode(corpus))

                def embed(sentences: Sequence[str]):
                    return whitening.transform(encode(sentences))
            scores[task] = evaluate_pairs(embed, pairs[task], task)
    results = {method: scores}
    print(format_table(results))
    if args.json:
        _write_json(args.json, {"scores": scores_json(results)})


# ---------------------------------------------------------------------------------------------- demo

def run_demo(args: argparse.Namespace, progress: bool) -> None:
    from flowkern.demo import run_demo as demo

    tasks = _tasks(args.tasks)
    if args.eager_steps < 1:
        raise CliError(f"--eager-steps must be positive, got {args.eager_steps} (--skip-eager for no eager timing)")
    encoder = dict(name_or_path=args.encoder, pooling=args.pooling, max_length=args.max_length, device=args.device,
                   cache_dir=args.cache_dir)
    demo(tasks, args.out_dir, encoder=encoder, flow=_flow_config(args), fit=_fit_kwargs(args, progress),
         seed=args.seed, data_dir=args.data_dir, max_pairs=args.max_pairs, eager_steps=args.eager_steps,
         eager_full=args.eager_full, skip_eager=args.skip_eager, random_pairs=args.random_pairs, progress=progress)


def _write_json(path: str | os.PathLike, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n", encoding="utf-8")


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
