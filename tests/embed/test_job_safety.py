"""What keeps the embedding job from losing or mixing rows (issue 17): kill -9 and --resume, the lock on --out,
workers that die with the job, a job that notices a dead worker, the job's identity (encoder, input rows,
options), verified shards, and one distinct error per problem."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import numpy as np
import pytest

from flowkern.embed import embed, identity, read_output, store
from flowkern.embed.identity import FileDigests
from flowkern.models import BertFlow
from tests.embed.common import (BIG_ROWS, BIG_SHARD_ROWS, DEADLINE_S, SENTENCES, alive, cli, done_shards, wait_for,
                                worker_pids)
from tests.models.tiny_bert import write_tiny_bert


def assert_same_output(actual, expected) -> None:
    assert actual[0] == expected[0]
    assert actual[1].dtype == expected[1].dtype and actual[1].tobytes() == expected[1].tobytes()


def _stop(job) -> None:
    if job.poll() is None:
        job.kill()
        job.wait(timeout=DEADLINE_S)


# ---- kill -9, a killed worker, orphans ----

def test_kill_9_then_resume_gives_the_uninterrupted_output(model_dir, big_input, big_reference, tmp_path):
    out = tmp_path / "killed"
    job = cli("embed", big_input, "--model", model_dir, "--out", out, "--shard-rows", BIG_SHARD_ROWS)
    try:
        wait_for(lambda: done_shards(out) >= 3 or job.poll() is not None, "3 done shards")
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=DEADLINE_S)
    finally:
        _stop(job)
    done_at_kill = done_shards(out)
    assert 3 <= done_at_kill < BIG_ROWS // BIG_SHARD_ROWS, f"{done_at_kill} shards were done when killed"
    report = embed(big_input, model_dir, out, shard_rows=BIG_SHARD_ROWS, resume=True)
    assert report.shards_skipped == done_at_kill and report.shards == BIG_ROWS // BIG_SHARD_ROWS - done_at_kill
    assert_same_output(read_output(out), big_reference)
    assert not list(out.glob(".*.tmp-*"))


def test_kill_9_of_the_job_kills_its_workers_and_resume_with_two_workers_gives_the_same_bytes(
        model_dir, big_input, big_reference, tmp_path):
    out = tmp_path / "killed"
    job = cli("embed", big_input, "--model", model_dir, "--out", out, "--shard-rows", BIG_SHARD_ROWS,
              "--devices", "cpu,cpu")
    try:
        wait_for(lambda: done_shards(out) >= 4 or job.poll() is not None, "4 done shards")
        workers = worker_pids(job.pid)
        assert len(workers) == 2 and job.poll() is None
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=DEADLINE_S)
    finally:
        _stop(job)
    # The death signal is immediate: workers still alive after 5 s are orphans writing into --out.
    wait_for(lambda: not any(map(alive, workers)), "the workers to die with the job", timeout=5)
    done_at_kill = done_shards(out)
    assert done_at_kill < BIG_ROWS // BIG_SHARD_ROWS, "the workers went on after the job was killed"
    report = embed(big_input, model_dir, out, shard_rows=BIG_SHARD_ROWS, devices=["cpu", "cpu"], resume=True)
    assert report.shards_skipped == done_at_kill
    assert_same_output(read_output(out), big_reference)


def test_a_worker_killed_by_sigkill_fails_the_job_at_once_naming_the_cause(model_dir, big_input, big_reference,
                                                                           tmp_path):
    out = tmp_path / "out"
    job = cli("embed", big_input, "--model", model_dir, "--out", out, "--shard-rows", BIG_SHARD_ROWS,
              "--devices", "cpu,cpu")
    try:
        wait_for(lambda: done_shards(out) >= 2 or job.poll() is not None, "2 done shards")
        victim = worker_pids(job.pid)[0]
        os.kill(victim, signal.SIGKILL)
        _, stderr = job.communicate(timeout=60)  # the old job waited forever here
    finally:
        _stop(job)
    # (The resource tracker may add a warning about the killed worker's semaphore.)
    errors = [line for line in stderr.splitlines() if line.startswith("flowkern embed: error:")]
    assert job.returncode == 1 and len(errors) == 1, stderr
    assert f"pid {victim}) was killed by SIGKILL" in errors[0] and "run again with --resume" in errors[0]
    embed(big_input, model_dir, out, shard_rows=BIG_SHARD_ROWS, resume=True)
    assert_same_output(read_output(out), big_reference)


# ---- one job per output directory ----

def test_a_second_job_on_the_same_out_fails_at_once_naming_the_first(model_dir, big_input, txt_input, tmp_path):
    out = tmp_path / "out"
    first = cli("embed", big_input, "--model", model_dir, "--out", out, "--shard-rows", BIG_SHARD_ROWS)
    try:
        lock = out / "job.lock"
        wait_for(lambda: lock.is_file() and f"pid {first.pid}" in lock.read_text() or first.poll() is not None,
                 "the first job's lock")
        assert first.poll() is None
        for options in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(BlockingIOError, match=rf"in use by another flowkern embed job \(pid {first.pid}\)"):
                embed(txt_input, model_dir, out, shard_rows=32, **options)
        _, stderr = first.communicate(timeout=DEADLINE_S)
    finally:
        _stop(first)
    assert first.returncode == 0, stderr
    ids, _ = read_output(out)
    assert len(ids) == BIG_ROWS and ids[0] == "big.txt:1"


def test_leftover_shards_without_a_manifest_are_never_adopted(model_dir, txt_input, tmp_path):
    out = tmp_path / "out"
    embed(txt_input, model_dir, out, shard_rows=32)
    (out / "manifest.json").unlink()
    other = tmp_path / "other.txt"
    other.write_text("\n".join(SENTENCES[:60]) + "\n")
    for resume in (False, True):
        with pytest.raises(ValueError, match="holds shard files but no manifest.json"):
            embed(other, model_dir, out, shard_rows=32, dtype="float16", resume=resume)
    embed(other, model_dir, out, shard_rows=32, dtype="float16", overwrite=True)
    ids, embeddings = read_output(out)
    assert len(ids) == len(embeddings) == 60 and embeddings.dtype == np.float16 and ids[-1] == "other.txt:60"


def test_a_done_shard_of_another_job_is_redone_not_adopted(model_dir, txt_input, tmp_path):
    embed(txt_input, model_dir, tmp_path / "a", shard_rows=32)
    expected = read_output(tmp_path / "a")
    embed(txt_input, model_dir, tmp_path / "b", shard_rows=32, pooled=True)
    for path in (tmp_path / "b").glob("shard-00001.*"):
        shutil.copy(path, tmp_path / "a" / path.name)
    report = embed(txt_input, model_dir, tmp_path / "a", shard_rows=32, resume=True)
    assert (report.shards_skipped, report.shards_redone, report.shards) == (3, 1, 1)
    assert_same_output(read_output(tmp_path / "a"), expected)


# ---- the job's identity ----

def test_a_changed_encoder_is_another_job_even_with_size_and_mtime_kept(tiny_bert, txt_input, tmp_path):
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_bert, encoder)
    model = BertFlow(str(encoder), flow={"levels": 2, "depth": 2, "hidden": 16}, seed=0)
    model.fit(SENTENCES, batch_size=32)
    model_dir = model.save(tmp_path / "model")
    embed(txt_input, model_dir, tmp_path / "out", shard_rows=32)
    weights = encoder / "model.safetensors"
    before = weights.stat()
    retrained = (write_tiny_bert(tmp_path / "retrained", seed=1) / "model.safetensors").read_bytes()
    assert len(retrained) == before.st_size
    weights.write_bytes(retrained)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ValueError, match=r"another job \(its encoder files \(model.safetensors\)"):
        embed(txt_input, model_dir, tmp_path / "out", shard_rows=32, resume=True)


def test_file_digests_are_computed_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    path, cache = tmp_path / "weights.bin", tmp_path / "cache" / "digests.json"
    path.write_bytes(b"a" * 1000)
    first = FileDigests(cache)
    digest = first.sha256(path)
    first.save()
    hashed = []
    real_sha256_file = identity.sha256_file
    monkeypatch.setattr(identity, "sha256_file", lambda p: hashed.append(p) or real_sha256_file(p))
    assert FileDigests(cache).sha256(path) == digest and hashed == []
    before = path.stat()
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert FileDigests(cache).sha256(path) != digest and hashed == [path]


def test_touching_the_input_keeps_the_job_and_an_edit_that_keeps_size_and_mtime_is_caught(model_dir, tmp_path):
    source, out = tmp_path / "in.txt", tmp_path / "out"
    source.write_text("\n".join(SENTENCES) + "\n")
    embed(source, model_dir, out, shard_rows=32)
    os.utime(source)  # touch
    assert embed(source, model_dir, out, shard_rows=32, resume=True).shards_skipped == 4
    before = source.stat()
    source.write_text(source.read_text().replace("A man", "A cat", 1))
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert source.stat().st_size == before.st_size
    with pytest.raises(ValueError, match="the input changed since this job started: shard 0 was made from rows "
                                         "in.txt:1 to in.txt:32"):
        embed(source, model_dir, out, shard_rows=32, resume=True)


# ---- verified shards ----

def test_resume_redoes_truncated_deleted_and_altered_shard_files(model_dir, txt_input, tmp_path):
    out = tmp_path / "out"
    embed(txt_input, model_dir, out, shard_rows=32)
    expected = read_output(out)
    truncated = out / "shard-00001.npy"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (out / "shard-00002.ids.npy").unlink()
    altered = bytearray((out / "shard-00003.npy").read_bytes())
    altered[-1] ^= 1
    (out / "shard-00003.npy").write_bytes(bytes(altered))
    report = embed(txt_input, model_dir, out, shard_rows=32, resume=True)
    assert (report.shards_skipped, report.shards_redone, report.shards) == (1, 3, 3)
    assert_same_output(read_output(out), expected)


def test_read_output_checks_every_shard_and_names_what_is_wrong(model_dir, txt_input, tmp_path):
    out = tmp_path / "out"
    embed(txt_input, model_dir, out, shard_rows=32)
    manifest_path, npy = out / "manifest.json", out / "shard-00001.npy"
    manifest_text, good = manifest_path.read_text(), npy.read_bytes()
    npy.write_bytes(good[:-128])
    with pytest.raises(ValueError, match=rf"shard-00001.npy: {len(good) - 128} bytes, its done marker says"):
        read_output(out)
    npy.unlink()
    with pytest.raises(ValueError, match="shard-00001.npy: missing"):
        read_output(out)
    npy.write_bytes(good)
    (out / "shard-00002.done.json").unlink()
    with pytest.raises(ValueError, match="shard-00002.done.json: missing"):
        read_output(out)
    for dropped, message in [(1, r"shard 1 \(shard-00001.done.json\) is missing from it"),
                             (-1, "its shards hold 96 rows, it says 120")]:
        manifest = json.loads(manifest_text)
        del manifest["shards"][dropped]
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=message):
            read_output(out)
    manifest_path.write_text(manifest_text[:50])
    with pytest.raises(ValueError, match="manifest.json: unreadable"):
        read_output(out)
    with pytest.raises(ValueError, match=r"manifest.json: unreadable .* is unknown: pass --overwrite"):
        embed(txt_input, model_dir, out, shard_rows=32, resume=True)


def test_disk_full_names_the_file_and_the_cause_and_resume_finishes(model_dir, txt_input, tmp_path, monkeypatch):
    out = tmp_path / "out"

    class FullDisk:
        """A file on a full disk: half of what is written reaches it, then ENOSPC."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return FullDisk(handle) if "shard-00002.npy" in str(path) else handle

    monkeypatch.setattr(store, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(OSError, match=r"cannot write \S*shard-00002.npy \(\d+ bytes\): No space left on device") \
            as caught:
        embed(txt_input, model_dir, out, shard_rows=32)
    assert caught.value.errno == errno.ENOSPC
    assert done_shards(out) == 2 and not list(out.glob(".*.tmp-*")) and not (out / "shard-00002.npy").exists()
    monkeypatch.undo()
    report = embed(txt_input, model_dir, out, shard_rows=32, resume=True)
    assert report.shards_skipped == 2 and len(read_output(out)[0]) == 120
