"""The command line, run as ``python -m flowkern`` in a subprocess on the tiny random BERT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


REPO = Path(__file__).resolve().parents[1]


def flowkern(*args, data_dir=None, check=True):
    env = {k: v for k, v in os.environ.items() if k != "FLOWKERN_DATA"}
    if data_dir is not None:
        env["FLOWKERN_DATA"] = str(data_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # tiny models: threads only add contention on a shared CPU
    result = subprocess.run([sys.executable, "-m", "flowkern", *map(str, args)], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def sentences_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    lines = [f"{who} is {doing} on the beach." for who in ("A man", "A woman", "The dog", "Two boys")
             for doing in ("playing", "running", "eating", "sitting", "walking")]
    path.write_text("\n".join(lines[:10]) + "\n\n   \r\n" + "\r\n".join(lines[10:]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fitted_model(tiny_bert, sentences_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "flow"
    result = flowkern("fit", "--text", sentences_file, "--out", out, "--encoder", tiny_bert, "--levels", "2",
                      "--depth", "2", "--batch-size", "8")
    assert "fitted on 20 sentences (20 distinct), 3 steps" in result.stdout
    return out


def test_help_lists_the_commands():
    out = flowkern("--help").stdout
    assert all(command in out for command in ("fit", "encode", "eval", "demo", "bench"))
    assert "not valid UTF-8" in " ".join(flowkern("fit", "--help").stdout.split())
    assert "--quick" in flowkern("bench", "--help").stdout


def test_bench_writes_the_report(tmp_path):
    # --smoke: tiny sizes on CPU (checks the harness; timings mean nothing); --quick has the same code path.
    report_path = tmp_path / "run" / "bench.json"
    result = flowkern("bench", "--smoke", "--no-compile", "--only", "^actnorm$", "--json", report_path)
    report = json.loads(report_path.read_text())
    assert report["meta"]["device"] and report["meta"]["torch"] and report["copy_bandwidth_gbs"] > 0
    variants = {row["variant"] for row in report["results"]}
    assert {"torch"} <= variants and all(row["status"] == "ok" for row in report["results"]), report["results"]
    assert report_path.with_suffix(".md").is_file() and "copy bandwidth" in result.stdout


def test_bench_models_suite_on_a_given_encoder(tiny_bert, sts_data_dir, tmp_path):
    # The fit and embedding rows on an encoder carried along (--encoder), on 48 STS sentences with --smoke; each
    # timing is a JSON line appended as it is measured (--jsonl), the Markdown beside it.
    rows = tmp_path / "bench.jsonl"
    flowkern("bench", "--smoke", "--suite", "models", "--encoder", tiny_bert, "--jsonl", rows, data_dir=sts_data_dir)
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    assert records[0]["record"] == "run" and records[0]["meta"]["suites"] == "models"
    assert records[0]["meta"]["encoder"] == str(Path(tiny_bert).resolve())
    results = {(r["family"], r["variant"]): r for r in records if r["record"] == "result"}
    assert set(results) == {("fit", "fast (first)"), ("fit", "fast (warm)"), ("fit", "reference"),
                            ("embed", "flowkern"), ("embed", "flowkern pooled"),
                            ("embed", "sentence-transformers fp32"), ("embed", "sentence-transformers fp16")}
    assert all(r["status"] == "ok" for r in results.values()), [r.get("error") for r in results.values()]
    assert all(r["sentences"] == 48 and r["sentences_per_s"] > 0 for (family, _), r in results.items()
               if family == "embed")
    assert results[("fit", "reference")]["steps"] == results[("fit", "fast (warm)")]["steps"] >= 1
    markdown = rows.with_suffix(".md").read_text()
    assert "## BertFlow.fit" in markdown and "## Embedding throughput" in markdown


def test_bench_models_suite_says_what_it_lacks(tmp_path):
    result = flowkern("bench", "--smoke", "--suite", "models", "--encoder", tmp_path / "missing", check=False)
    assert result.returncode == 2 and f"encoder {tmp_path / 'missing'}: no such directory" in result.stderr
    rows = tmp_path / "bench.jsonl"
    result = flowkern("bench", "--smoke", "--suite", "models", "--jsonl", rows)   # no STS data
    assert "left out: models suite (BertFlow.fit, embedding throughput): no STS data" in result.stdout
    assert [json.loads(line)["record"] for line in rows.read_text().splitlines()] == ["run", "skipped"]


def test_fit_then_encode(fitted_model, sentences_file, tmp_path):
    config = json.loads((fitted_model / "config.json").read_text())
    assert config["flow"]["levels"] == 2 and (fitted_model / config["encoder"]).is_dir()
    result = flowkern("encode", fitted_model, sentences_file, tmp_path / "z")
    out = tmp_path / "z.npy"  # np.save's name, and the one reported
    assert result.stdout.strip().endswith(f"embeddings to {out}") and not (tmp_path / "z").exists()
    embeddings = np.load(out)
    assert embeddings.shape == (20, 32) and embeddings.dtype == np.float32
    flowkern("encode", fitted_model, sentences_file, tmp_path / "pooled.npy", "--pooled")
    assert not np.allclose(np.load(tmp_path / "pooled.npy"), embeddings)


def test_fit_on_a_task_and_eval(tiny_bert, sts_data_dir, tmp_path):
    out = tmp_path / "flow"
    flowkern("fit", "--task", "sts13", "--max-pairs", "60", "--out", out, "--encoder", tiny_bert, data_dir=sts_data_dir)
    result = flowkern("eval", "--model", out, "--tasks", "sts13,stsb", "--max-pairs", "60", "--json",
                      tmp_path / "scores.json", data_dir=sts_data_dir)
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    (method,) = scores
    assert set(scores[method]) == {"sts13", "stsb"} and "STS13" in result.stdout
    assert set(scores[method]["sts13"]["subsets"]) == {"FNWN", "OnWN", "headlines"}


def test_eval_whitening_baseline(tiny_bert, sts_data_dir, tmp_path):
    result = flowkern("eval", "--baseline", "whitening", "--setting", "train", "--encoder", tiny_bert,
                      "--tasks", "sickr", "--max-pairs", "80", "--data-dir", sts_data_dir)
    assert result.stdout.splitlines()[1].startswith("whitening (train)")


def test_demo_writes_table_json_and_plot(tiny_bert, sts_data_dir, tmp_path):
    out = tmp_path / "demo"
    result = flowkern("demo", "--encoder", tiny_bert, "--tasks", "stsb,sts12", "--max-pairs", "60",
                      "--random-pairs", "300", "--out-dir", out, "--data-dir", sts_data_dir)
    report = json.loads((out / "results.json").read_text())
    assert set(report["scores"]) == {"pooled", "whitening (target)", "flow (target)"}
    assert set(report["scores"]["flow (target)"]) == {"stsb", "sts12"}
    timing = report["timing"]
    assert timing["task"] == "stsb" and timing["fast"]["n_sentences"] == 3 * 2 * 60
    assert timing["eager"]["steps"] == timing["fast"]["steps"] and timing["eager_over_fast"] > 0
    assert report["anisotropy"]["pairs"] == 300
    assert (out / "anisotropy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "flow (target)" in result.stdout and "eager path" in result.stdout


def test_missing_data_dir_says_how_to_set_it(tiny_bert):
    result = flowkern("eval", "--baseline", "pooled", "--encoder", tiny_bert, check=False)
    assert result.returncode == 1
    assert "FLOWKERN_DATA" in result.stderr and "--data-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_text_files_with_lone_cr_line_endings_have_lines(tmp_path):
    from flowkern.cli import read_sentences

    path = tmp_path / "old-mac.txt"
    path.write_bytes(b"first\rsecond\r\rthird\r\nfourth\n")
    assert read_sentences(path) == ["first", "second", "third", "fourth"]


def test_text_file_errors(tiny_bert, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nanother\nbroken \xff byte\n")
    result = flowkern("fit", "--text", bad, "--out", tmp_path / "m", "--encoder", tiny_bert, check=False)
    assert result.returncode == 1 and "bad.txt:3: not valid UTF-8" in result.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = flowkern("fit", "--text", empty, "--out", tmp_path / "m", "--encoder", tiny_bert, check=False)
    assert result.returncode == 1 and "empty corpus" in result.stderr


def test_fit_bundle_writes_a_self_contained_model_directory(tiny_bert, sentences_file, fitted_model, tmp_path):
    out = tmp_path / "model"
    flowkern("fit", "--text", sentences_file, "--out", out, "--encoder", tiny_bert, "--levels", "2", "--depth", "2",
             "--batch-size", "8", "--bundle")
    assert json.loads((out / "config.json").read_text())["encoder"] == "./encoder"
    moved = out.rename(tmp_path / "moved")
    flowkern("encode", moved, sentences_file, tmp_path / "bundled.npy")
    flowkern("encode", fitted_model, sentences_file, tmp_path / "plain.npy")
    # The same seeded fit on the same encoder, whether its files are bundled or not.
    np.testing.assert_allclose(np.load(tmp_path / "bundled.npy"), np.load(tmp_path / "plain.npy"), atol=1e-6)


def test_demo_times_the_eager_path_on_a_stated_number_of_steps(tiny_bert, sts_data_dir, tmp_path):
    out = tmp_path / "demo"
    result = flowkern("demo", "--encoder", tiny_bert, "--tasks", "stsb", "--max-pairs", "60", "--eager-steps", "2",
                      "--random-pairs", "100", "--out-dir", out, "--data-dir", sts_data_dir)
    timing = json.loads((out / "results.json").read_text())["timing"]
    assert timing["eager_steps"] == 2 and timing["fast"]["steps"] == 6  # the fast path's full fit: 360 / 64
    assert timing["eager"]["path"] == "eager" and timing["eager"]["steps"] == 2
    assert timing["fast_same_steps"]["path"] == "fast" and timing["fast_same_steps"]["steps"] == 2
    assert timing["eager_over_fast"] == pytest.approx(
        timing["eager"]["total_seconds"] / timing["fast_same_steps"]["total_seconds"])
    assert "first 2 steps (same batches), eager path" in result.stdout and "for 2 steps" in result.stdout
    bad = flowkern("demo", "--encoder", tiny_bert, "--eager-steps", "0", "--out-dir", out,
                   "--data-dir", sts_data_dir, check=False)
    assert bad.returncode != 0 and "--eager-steps must be positive" in bad.stderr
