"""Fixtures of the embedding-job tests: a fitted tiny model, small and large inputs, and their reference outputs."""
from __future__ import annotations

from pathlib import Path

import pytest

from flowkern.embed import embed, read_output
from flowkern.models import BertFlow
from tests.embed.common import BIG_ROWS, BIG_SHARD_ROWS, SENTENCES


@pytest.fixture(autouse=True, scope="module")
def _digest_cache(tmp_path_factory):
    """The job caches file digests under $XDG_CACHE_HOME: a directory of the test session, not the user's
    (inherited by the CLI subprocesses). Module-scoped, so it is in place before the module's fixtures run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
        yield


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


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    """BIG_ROWS rows, one sentence a line."""
    path = tmp_path_factory.mktemp("big") / "big.txt"
    path.write_text("\n".join(SENTENCES[i % 120] + f" {i}" for i in range(BIG_ROWS)) + "\n")
    return path


@pytest.fixture(scope="module")
def big_reference(big_input, model_dir, tmp_path_factory):
    """(ids, embeddings) of an uninterrupted in-process run on big_input."""
    out = tmp_path_factory.mktemp("big-reference") / "out"
    embed(big_input, model_dir, out, shard_rows=BIG_SHARD_ROWS)
    return read_output(out)
