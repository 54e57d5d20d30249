"""The embedding job: formats, shards, resume after kill -9, refused foreign output, errors, several workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flowkern.embed import embed, read_output
from flowkern.models import BertFlow
from flowkern.nn import Glow

REPO = Path(__file__).resolve().parents[2]
WHO = ("A man", "A woman", "The dog", "Two girls", "Three boys", "The child")
DOING = ("is playing", "is running", "is eating", "sits", "walks")
WHERE = ("on the beach", "in the snow", "near the car", "with a red ball")
SENTENCES = [f"{w} {d} {p}." for w in WHO for d in DOING for p in WHERE]  # 120 distinct


@pytest.fixture(scope="module")
def model_dir(tiny_bert, tmp_path_factory) -> Path:
    model = BertFlow(tiny_bert, flow={"levels": 2, "depth": 2, "hidden": 16}, seed=0)
    model.fit(SENTENCES, batch_size=32)
    return model.save(tmp_path_factory.mktemp("model") / "flow")


@pytest.fixture(scope="module")
def model(model_dir) -> BertFlow:
    return BertFlow.load(model_dir)


@pytest.fixture(scope="module")
def txt_input(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "sentences.txt"
    path.write_text("\n".join(SENTENCES[:50]) + "\n\n" + "\n".join(SENTENCES[50:]) + "\n", encoding="utf-8")
    return path


def test_embeddings_match_encode_and_ids_are_stable(model_dir, model, txt_input, tmp_path):
    report = embed(txt_input, model_dir, tmp_path / "out", shard_rows=32)
    ids, embeddings = read_output(tmp_path / "out")
    assert report.rows == 120 and report.shards == 4 and report.dim == 32
    assert ids[:2] == ["sentences.txt:1", "sentences.txt:2"] and ids[50] == "sentences.txt:52"  # blank line 51
    assert embeddings.shape == (120, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, model.encode(SENTENCES), rtol=1e-4, atol=1e-5)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 120 and len(manifest["shards"]) == 4


def test_pooled_and_float16(model_dir, model, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "out", pooled=True, dtype="float16", shard_rows=50)
    _, embeddings = read_output(tmp_path / "out")
    assert embeddings.dtype == np.float16
    np.testing.assert_allclose(embeddings.astype(np.float32), model.pooled(SENTENCES).numpy(), rtol=2e-3,
                               atol=2e-3)


def test_input_formats_and_parquet_output_agree(model_dir, txt_input, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": s, "key": f"k{i}"}) + "\n" for i, s in enumerate(SENTENCES)))
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": SENTENCES, "key": [f"k{i}" for i in range(len(SENTENCES))]}), parquet,
                   row_group_size=50)
    embed(txt_input, model_dir, tmp_path / "txt", shard_rows=40)
    embed(jsonl, model_dir, tmp_path / "jsonl", field="sentence", shard_rows=40)
    embed(parquet, model_dir, tmp_path / "pq", column="body", id_column="key", shard_rows=40, format="parquet")
    ids_txt, txt = read_output(tmp_path / "txt")
    ids_jsonl, from_jsonl = read_output(tmp_path / "jsonl")
    ids_pq, from_parquet = read_output(tmp_path / "pq")
    assert ids_jsonl[0] == "rows.jsonl:1" and ids_pq[:2] == ["k0", "k1"]
    np.testing.assert_array_equal(from_jsonl, txt)
    np.testing.assert_array_equal(from_parquet, txt)


def test_directory_input_reads_every_file_in_order(model_dir, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("\n".join(SENTENCES[:7]) + "\n")
    (folder / "b" / "c.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[7:12]))
    (folder / "notes.md").write_text("not an input")
    embed(folder, model_dir, tmp_path / "out")
    ids, embeddings = read_output(tmp_path / "out")
    assert ids[0] == "a.txt:1" and ids[7] == "b/c.jsonl:1" and len(ids) == 12 == len(embeddings)


def _cli(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "flowkern", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_gives_the_uninterrupted_output(model_dir, tmp_path):
    big = tmp_path / "big.txt"
    rows = 6000
    big.write_text("\n".join(SENTENCES[i % 120] + f" {i}" for i in range(rows)) + "\n")
    shard_rows = 100
    embed(big, model_dir, tmp_path / "whole", shard_rows=shard_rows)

    out = tmp_path / "killed"
    job = _cli("embed", big, "--model", model_dir, "--out", out, "--shard-rows", shard_rows)
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard-*.done.json"))) < 3 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done_at_kill = len(list(out.glob("shard-*.done.json")))
    assert 3 <= done_at_kill < rows // shard_rows, f"{done_at_kill} shards were done when killed"
    report = embed(big, model_dir, out, shard_rows=shard_rows, resume=True)
    assert report.shards_skipped == done_at_kill and report.shards == rows // shard_rows - done_at_kill
    ids, embeddings = read_output(out)
    ids_whole, whole = read_output(tmp_path / "whole")
    assert ids == ids_whole
    assert embeddings.tobytes() == whole.tobytes()
    assert not list(out.glob(".*.tmp-*"))


def test_resume_after_the_last_shard_does_nothing(model_dir, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "out", shard_rows=50)
    before = read_output(tmp_path / "out")
    report = embed(txt_input, model_dir, tmp_path / "out", shard_rows=50, resume=True)
    assert report.shards == 0 and report.shards_skipped == 3
    after = read_output(tmp_path / "out")
    assert before[0] == after[0] and before[1].tobytes() == after[1].tobytes()


def test_foreign_or_finished_output_is_refused_unless_asked(model_dir, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "out", shard_rows=50)
    with pytest.raises(ValueError, match="another job"):
        embed(txt_input, model_dir, tmp_path / "out", shard_rows=60)
    with pytest.raises(ValueError, match="another job"):
        embed(txt_input, model_dir, tmp_path / "out", shard_rows=50, pooled=True, resume=True)
    with pytest.raises(ValueError, match="already holds this job's output"):
        embed(txt_input, model_dir, tmp_path / "out", shard_rows=50)
    embed(txt_input, model_dir, tmp_path / "out", shard_rows=60, overwrite=True)
    ids, _ = read_output(tmp_path / "out")
    assert len(ids) == 120 and len(list((tmp_path / "out").glob("shard-*.done.json"))) == 2


def test_two_workers_give_the_same_output(model_dir, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "one", shard_rows=25)
    embed(txt_input, model_dir, tmp_path / "two", shard_rows=25, devices=["cpu", "cpu"])
    one, two = read_output(tmp_path / "one"), read_output(tmp_path / "two")
    assert one[0] == two[0]
    np.testing.assert_allclose(two[1], one[1], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_embedding_matches_cpu(model_dir, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "cpu", shard_rows=50, devices=["cpu"])
    embed(txt_input, model_dir, tmp_path / "gpu", shard_rows=50, devices=["cuda:0"])
    cpu, gpu = read_output(tmp_path / "cpu"), read_output(tmp_path / "gpu")
    assert cpu[0] == gpu[0]
    # The GPU encoder runs in bf16: rows agree in direction, not to fp32 precision.
    cosine = (gpu[1] * cpu[1]).sum(1) / np.linalg.norm(gpu[1], axis=1) / np.linalg.norm(cpu[1], axis=1)
    assert cosine.min() > 0.99


# ---- errors, each in one line naming the problem ----

def test_input_errors(model_dir, tmp_path):
    cases = {
        "notes.csv": ("a,b\n", "unknown input format '.csv'"),
        "rows.jsonl": ('{"text": "fine"}\n{"body": "no text"}\n', r"rows.jsonl:2: no field 'text'"),
        "broken.jsonl": ('{"text": "fine"}\n{not json\n', r"broken.jsonl:2: not valid JSON"),
        "bad.txt": (b"fine\n\xff\xfe bad bytes\n", r"bad.txt:2: not valid UTF-8"),
        "empty.txt": ("\n  \n", "empty input"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError, match=message):
            embed(path, model_dir, tmp_path / f"out-{name}")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        embed(tmp_path / "missing.txt", model_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="no file"):
        embed(str(tmp_path / "*.nothing"), model_dir, tmp_path / "out")


def test_parquet_column_errors(model_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["a b", "c d"]}), tmp_path / "rows.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' \(has \['body'\]\); choose it with --column"):
        embed(tmp_path / "rows.parquet", model_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="no column 'key'"):
        embed(tmp_path / "rows.parquet", model_dir, tmp_path / "out", column="body", id_column="key")


def test_model_dir_errors(txt_input, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        embed(txt_input, tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        embed(txt_input, tmp_path / "empty", tmp_path / "out")


def test_corrupt_config_and_incomplete_flow_config_are_named(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "flow.safetensors"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / "config.json").write_text('{"format": "flowkern.bertflow", ')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        BertFlow.load(broken)
    with pytest.raises(ValueError, match=r"missing keys \['depth'\]"):
        Glow.from_config({"n_levels": 2, "coupling_width": 16}, channels=8)


def test_cli_embed_and_its_errors(model_dir, txt_input, tmp_path):
    job = _cli("embed", txt_input, "--model", model_dir, "--out", tmp_path / "out", "--shard-rows", 64)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    assert "120 sentences" in stdout
    ids, embeddings = read_output(tmp_path / "out")
    assert len(ids) == 120
    job = _cli("embed", tmp_path / "nothing.txt", "--model", model_dir, "--out", tmp_path / "out2")
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 1 and len(stderr.strip().splitlines()) == 1 and "no such file" in stderr
