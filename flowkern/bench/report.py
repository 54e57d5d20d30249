"""`flowkern bench`'s report: the environment of a run, the Markdown tables, the JSON file (--json) and the JSON
lines file that several runs can share (--jsonl)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import flowkern

from .cases import COMPILED, DISPATCH_CALLS

SOURCE_TREE = Path(__file__).resolve().parents[2]   # a git checkout for editable installs (commit in the report)
TARGET_SHARE_OF_COPY = 0.80   # the bandwidth target for ActNorm and the coupling epilogue

def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SOURCE_TREE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, python=platform.python_version(),
        flowkern=flowkern.__version__, git_commit=commit, backends=flowkern.backends())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _detail_cell(row: dict | None) -> str:
    if row is None or row["status"] != "ok" or "gpu_ops" not in row:
        return ""
    return (f"{row['gpu_ops']} / {row['host_syncs']} / {row['gpu_busy_ms']:.3f} / "
            f"{row['first_call_ms']:.0f}")


def cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    if row["family"] == "fit":
        return f"{row['ms'] / 1e3:.1f} / {row['encode_s']:.1f} / {row['flow_s']:.2f} s"
    if row["family"] == "embed":
        text = f"{row['sentences_per_s']:.0f}/s"
        shares = [f"{label} {100 * row[key]:.0f}%" for key, label in (("tokenizer_share", "tokenizer"),
                                                                     ("gpu_busy_share", "GPU busy")) if key in row]
        return text + (f" ({', '.join(shares)})" if shares else "")
    text = f"{row['ms']:.3f} ms"
    if "gbs" in row:
        text += f" · {row['gbs']:.0f} GB/s ({100 * row['share_of_copy']:.0f}%)"
    return text


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# flowkern benchmark — {meta['device']}", "",
             "| | |", "|---|---|"]
    for key in ("date", "device", "torch", "triton", "cuda", "python", "flowkern", "git_commit", "backends",
                "suites", "encoder", "timing", "compile", "note", "elapsed_s"):
        if meta.get(key) is not None:
            lines.append(f"| {key} | {meta[key]} |")
    lines += ["", f"Measured copy bandwidth: **{report['copy_bandwidth_gbs']:.0f} GB/s** "
                  f"(2 x bytes / time of a {meta['copy_mebibytes']} MiB copy). Cells: median time · achieved GB/s "
                  f"(share of copy bandwidth), for memory-bound ops.", ""]
    lines += _target_lines(report)
    for family, title in (("op", "Ops"), ("nn", "Layers (flowkern.nn)"), ("glow", "BERT-flow Glow (whole flow)"),
                          ("dispatch", f"Host overhead ({DISPATCH_CALLS} calls; ms vs GPU busy ms)"),
                          ("fit", "BertFlow.fit (seconds: total / encode / flow)"),
                          ("embed", "Embedding throughput (sentences/s)")):
        rows = [r for r in report["results"] if r["family"] == family]
        if not rows:
            continue
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        lines += ["", f"## {title}", "", "| case | shape | dtype | mode | " + " | ".join(variants) + " |",
                  "|" + "---|" * (4 + len(variants))]
        table: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            table.setdefault((r["case"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"]), {})[r["variant"]] = r
        for key, by_variant in table.items():
            cells = [cell(by_variant.get(v)) for v in variants]
            lines.append("| " + " | ".join(list(key) + cells) + " |")
        if family == "glow" and any("gpu_ops" in r for r in rows):
            lines += ["", "Per call: GPU operations launched / host syncs / GPU busy ms / first call ms "
                          "(compilation included).", "",
                      "| case | shape | dtype | mode | " + " | ".join(variants) + " |",
                      "|" + "---|" * (4 + len(variants))]
            for key, by_variant in table.items():
                cells = [_detail_cell(by_variant.get(v)) for v in variants]
                lines.append("| " + " | ".join(list(key) + cells) + " |")
    errors = [r for r in report["results"] if r["status"] == "error"]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {r['case']} {r['shape']} {r['dtype']} {r['mode']} [{r['variant']}]: {r['error']}" for r in errors]
    if report["skipped"]:
        lines += ["", f"## Not run ({len(report['skipped'])}: cut by the time budget, or lacking what they need)", ""]
        lines += [f"- {s}" for s in report["skipped"][:50]]
    if report["graph_breaks"]:
        lines += ["", "## torch.compile graphs (torch._dynamo.explain)", "", "| function | graphs and breaks |",
                  "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["graph_breaks"].items()]
    return "\n".join(lines) + "\n"


def _target_lines(report: dict) -> list[str]:
    rows = [r for r in report["results"] if r["status"] == "ok" and r["family"] == "op" and "share_of_copy" in r
            and r["case"] in ("actnorm", "coupling_epilogue_additive", "coupling_epilogue_affine")
            and r["shape"][0] >= 65536
            and r["variant"] not in ("torch", COMPILED)]
    if not rows:
        return []
    lines = [f"Target: kernels >= {TARGET_SHARE_OF_COPY:.0%} of copy bandwidth at B >= 65536 "
             "(ActNorm, coupling epilogue):", ""]
    for r in rows:
        verdict = "meets" if r["share_of_copy"] >= TARGET_SHARE_OF_COPY else "BELOW"
        lines.append(f"- {r['variant']} {r['case']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['mode']}: "
                     f"{100 * r['share_of_copy']:.0f}% — {verdict}")
    return lines


def _replace_file(path: Path, text: str) -> None:
    """Write through a temporary file, so that a run killed mid-write leaves the previous version, not half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_report(report: dict, stem: Path) -> tuple[Path, Path]:
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    _replace_file(json_path, json.dumps(report, indent=1) + "\n")
    _replace_file(md_path, markdown(report))
    return json_path, md_path


class JsonLines:
    """--jsonl: one record a line, appended as it exists ("run": the meta of one invocation; "result": one timing;
    "skipped"; "graph_breaks"), so several runs (gpu_check.sh's phases) share one file and a killed run keeps every
    line written before; the Markdown beside it is rewritten from the whole file after every case."""

    def __init__(self, path: Path):
        self.path, self.md_path = path, path.with_suffix(".md")
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, kind: str, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"record": kind, **record}) + "\n")

    def report(self) -> dict:
        runs, results, skipped, graph_breaks = [], [], [], {}
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:   # a line cut by a kill
                continue
            kind = record.pop("record")
            if kind == "run":
                runs.append(record)
            elif kind == "result":
                results.append(record)
            elif kind == "skipped":
                skipped.append(record["case"])
            elif kind == "graph_breaks":
                graph_breaks.update(record["functions"])
        meta = dict(runs[0]["meta"]) if runs else {}
        meta["suites"] = ", ".join(run["meta"]["suites"] for run in runs)
        return dict(meta=meta, copy_bandwidth_gbs=runs[0]["copy_bandwidth_gbs"] if runs else float("nan"),
                    results=results, skipped=skipped, graph_breaks=graph_breaks)

    def write_markdown(self) -> Path:
        _replace_file(self.md_path, markdown(self.report()))
        return self.md_path
