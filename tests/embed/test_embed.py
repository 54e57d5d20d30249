"""The embedding job: formats, shards, inputs, resume, refused foreign output, errors."""
from __future__ import annotations

import gzip
import io
import json
import shutil

import numpy as np
import pytest
import torch

from flowkern.cli import main
from flowkern.embed import Embedder, embed, read_output, reader
from flowkern.models import BertFlow
from flowkern.nn import Glow
from tests.embed.common import SENTENCES, cli


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


def test_directory_input_reads_every_input_file_in_order(model_dir, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.TXT").write_text("\n".join(SENTENCES[:7]) + "\n")
    (folder / "b" / "c.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[7:12]))
    with gzip.open(folder / "b" / "d.txt.gz", "wt") as handle:
        handle.write("\n".join(SENTENCES[12:15]) + "\n")
    (folder / ".notes.md").write_text("hidden: not an input")
    embed(folder, model_dir, tmp_path / "out")
    ids, embeddings = read_output(tmp_path / "out")
    assert ids[0] == "a.TXT:1" and ids[7] == "b/c.jsonl:1" and ids[12] == "b/d.txt.gz:1"
    assert len(ids) == 15 == len(embeddings)


def test_directory_with_files_that_are_not_inputs_is_refused_naming_them(model_dir, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("A man is playing.\n")
    (folder / "table.csv").write_text("text\nA dog runs.\n")
    (folder / "more.txt.bz2").write_bytes(b"BZh9")
    with pytest.raises(ValueError, match=r"2 files are not inputs \(more.txt.bz2, table.csv\)"):
        embed(folder, model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cr_only_line_endings_are_lines(model_dir, tmp_path):
    path = tmp_path / "old-mac.txt"
    path.write_bytes("\r".join(SENTENCES[:3]).encode() + b"\r\r" + SENTENCES[3].encode() + b"\r\n" +
                     SENTENCES[4].encode() + b"\n")
    embed(path, model_dir, tmp_path / "out")
    ids, _ = read_output(tmp_path / "out")
    assert ids == ["old-mac.txt:1", "old-mac.txt:2", "old-mac.txt:3", "old-mac.txt:5", "old-mac.txt:6"]


def test_line_endings_split_across_read_chunks_are_one_ending(monkeypatch):
    monkeypatch.setattr(reader, "_READ_CHUNK", 1)
    lines = reader.split_lines(io.BytesIO(b"a\r\nb\rc\n\r\nd\r"))
    assert list(lines) == [b"a", b"b", b"c", b"", b"d"]


def test_out_inside_the_input_directory_is_not_read_as_input(model_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "corpus"
    folder.mkdir()
    pq.write_table(pa.table({"text": SENTENCES[:30]}), folder / "rows.parquet")
    embed(folder, model_dir, folder / "embeddings", format="parquet", shard_rows=10)
    report = embed(folder, model_dir, folder / "embeddings", format="parquet", shard_rows=10, resume=True)
    assert report.shards_skipped == 3 and report.shards == 0
    assert len(read_output(folder / "embeddings")[0]) == 30


def test_duplicate_id_column_values_are_refused(model_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": s, "key": f"k{i % 7}"}) + "\n" for i, s in enumerate(SENTENCES[:9])))
    with pytest.raises(ValueError, match="duplicate id 'k0' in --id-column 'key'"):
        embed(rows, model_dir, tmp_path / "out", id_column="key")
    assert not (tmp_path / "out").exists()


def test_a_str_is_one_sentence(model):
    np.testing.assert_array_equal(Embedder(model)("A man is playing."), Embedder(model)(["A man is playing."])[0])


def test_one_flow_call_per_window_gives_the_per_batch_path_s_embeddings(model, monkeypatch):
    embedder = Embedder(model, batch_tokens=64)   # small batches: many per window
    texts = SENTENCES[::-1]
    batches = embedder.tokenize(texts)
    assert len(batches) > 3
    expected = np.empty((len(texts), embedder.dim), dtype=np.float32)
    for batch in batches:   # the previous path: the flow applied batch by batch
        expected[batch.positions] = model.transform(model.encoder.pool_tokens(batch.input_ids,
                                                                              batch.attention_mask)).numpy()
    calls = []
    transform = model.transform
    monkeypatch.setattr(model, "transform", lambda x: calls.append(len(x)) or transform(x))
    np.testing.assert_allclose(embedder.embed_batches(batches, len(texts)), expected, rtol=1e-5, atol=1e-5)
    assert calls == [len(texts)]
    assert Embedder(model)([]).shape == (0, embedder.dim)


def test_int8_job_matches_the_in_process_int8_embedder_and_is_its_own_job(model_dir, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "out", shard_rows=50, quantize="int8")
    ids, embeddings = read_output(tmp_path / "out")
    int8 = Embedder(BertFlow.load(model_dir, device="cpu", quantize="int8"))
    # Shard by shard: int8 activations are scaled per batch, so a row's embedding depends a little on its batch.
    by_shard = np.concatenate([int8(SENTENCES[start:start + 50]) for start in range(0, 120, 50)])
    np.testing.assert_allclose(embeddings, by_shard, rtol=1e-5, atol=1e-5)
    fp32 = BertFlow.load(model_dir, device="cpu")
    assert not np.allclose(embeddings, Embedder(fp32)(SENTENCES), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"another job \(its quantize 'int8' \(now None\)"):
        embed(txt_input, model_dir, tmp_path / "out", shard_rows=50, resume=True)
    with pytest.raises(ValueError, match=r"unknown quantize 'int4'"):
        embed(txt_input, model_dir, tmp_path / "bad", quantize="int4")
    assert not (tmp_path / "bad").exists()


def test_resume_after_the_last_shard_does_nothing(model_dir, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "out", shard_rows=50)
    before = read_output(tmp_path / "out")
    report = embed(txt_input, model_dir, tmp_path / "out", shard_rows=50, resume=True)
    assert report.shards == 0 and report.shards_skipped == 3 and report.shards_redone == 0
    after = read_output(tmp_path / "out")
    assert before[0] == after[0] and before[1].tobytes() == after[1].tobytes()


def test_foreign_or_finished_output_is_refused_unless_asked(model_dir, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "out", shard_rows=50)
    with pytest.raises(ValueError, match=r"another job \(its shard_rows 50 \(now 60\)"):
        embed(txt_input, model_dir, tmp_path / "out", shard_rows=60)
    with pytest.raises(ValueError, match=r"another job \(its pooled False \(now True\)"):
        embed(txt_input, model_dir, tmp_path / "out", shard_rows=50, pooled=True, resume=True)
    with pytest.raises(ValueError, match="already holds this job's finished output"):
        embed(txt_input, model_dir, tmp_path / "out", shard_rows=50)
    embed(txt_input, model_dir, tmp_path / "out", shard_rows=60, overwrite=True)
    ids, _ = read_output(tmp_path / "out")
    assert len(ids) == 120 and len(list((tmp_path / "out").glob("shard-*.done.json"))) == 2


def test_batch_tokens_are_part_of_the_job_and_zero_is_refused(model_dir, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "out", shard_rows=50, batch_tokens=256)
    with pytest.raises(ValueError, match=r"another job \(its batch_tokens 256 \(now 2048\)"):
        embed(txt_input, model_dir, tmp_path / "out", shard_rows=50, resume=True)
    with pytest.raises(ValueError, match=r"batch_tokens \(0\) must hold at least one sentence"):
        embed(txt_input, model_dir, tmp_path / "zero", batch_tokens=0)
    assert not (tmp_path / "zero").exists()


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
        "fake.txt.gz": ("not gzip", r"fake.txt.gz: not a readable gzip file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ValueError, match=message):
            embed(path, model_dir, tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        embed(tmp_path / "missing.txt", model_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="no file"):
        embed(str(tmp_path / "*.nothing"), model_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="given twice"):
        embed([tmp_path / "empty.txt", tmp_path / "empty.txt"], model_dir, tmp_path / "out")


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
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        embed(txt_input, tmp_path / "empty", tmp_path / "out")


def test_corrupt_config_and_incomplete_flow_config_are_named(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text('{"format": "flowkern.bertflow", ')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        BertFlow.load(broken)
    with pytest.raises(ValueError, match=r"missing keys \['depth'\]"):
        Glow.from_config({"n_levels": 2, "coupling_width": 16}, channels=8)


def test_damaged_weights_fail_the_start_without_leaving_a_manifest(model_dir, txt_input, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    weights = (model / "flow.safetensors").read_bytes()
    (model / "flow.safetensors").write_bytes(weights[:len(weights) // 2])
    for devices in (None, ["cpu"]):
        with pytest.raises(ValueError, match=r"flow.safetensors: damaged"):
            embed(txt_input, model, tmp_path / "out", devices=devices)
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes").write_text("the user's own file")
    with pytest.raises(ValueError, match=r"flow.safetensors: damaged"):
        embed(txt_input, model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes"]
    (model / "flow.safetensors").write_bytes(weights)
    assert embed(txt_input, model, tmp_path / "out").rows == 120  # the retry needs no --overwrite


def test_devices_without_cuda_are_refused(model_dir, txt_input, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"device 'cuda:0': CUDA is not available on this machine"):
        embed(txt_input, model_dir, tmp_path / "out", devices=["cuda:0"])
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'"):
        embed(txt_input, model_dir, tmp_path / "out", devices=["gpu0"])
    assert not (tmp_path / "out").exists()


def test_an_uncached_hub_encoder_fails_the_job_s_identity_in_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from flowkern.embed.identity import FileDigests, encoder_identity

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"^encoder 'flowkern-tests/no-such-model' is not in the local HuggingFace "
                                      r"cache and the hub cannot be reached \(offline\)"):
        encoder_identity("flowkern-tests/no-such-model", FileDigests(tmp_path / "digests.json"))


def test_cli_embed_and_its_errors(model_dir, txt_input, tmp_path, capsys):
    job = cli("embed", txt_input, "--model", model_dir, "--out", tmp_path / "out", "--shard-rows", 64)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr
    assert "120 sentences" in stdout
    ids, embeddings = read_output(tmp_path / "out")
    assert len(ids) == 120
    for args, message in [((tmp_path / "nothing.txt",), "no such file"),
                          ((txt_input, "--batch-tokens", 0), "batch_tokens (0) must hold"),
                          ((txt_input, "--devices", "cpu,gpu0"), "unknown device 'gpu0'"),
                          ((txt_input, "--quantize", "int8", "--resume"), "its quantize None (now 'int8')"),
                          ((txt_input,), "already holds this job's finished output; pass --resume")]:
        assert main(["embed", *map(str, args), "--model", str(model_dir), "--out", str(tmp_path / "out"),
                     "--shard-rows", "64"]) == 1
        stderr = capsys.readouterr().err
        assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert main(["embed", str(txt_input), "--model", str(model_dir), "--out", str(tmp_path / "int8"),
                 "--quantize", "int8"]) == 0
    assert json.loads((tmp_path / "int8" / "manifest.json").read_text())["job"]["options"]["quantize"] == "int8"

