"""sentence-transformers modules and the Ray Data predictor, against BertFlow.encode (skipped where the optional
dependency does not install). The Ray Data pipeline itself runs as the README shows it, in tests/test_readme.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowkern.models import BertFlow
from tests.embed.common import SENTENCES


@pytest.fixture(scope="module")
def fitted(tiny_bert, tmp_path_factory) -> tuple[BertFlow, Path]:
    model = BertFlow(tiny_bert, flow={"levels": 2, "depth": 2, "hidden": 16, "coupling": "affine"}, seed=0)
    model.fit(SENTENCES, batch_size=32)
    return model, model.save(tmp_path_factory.mktemp("model") / "flow")


def test_sentence_transformer_encodes_saves_and_loads_with_the_flow(fitted, tmp_path):
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    from sentence_transformers import SentenceTransformer

    from flowkern.integrations.sentence_transformers import to_sentence_transformer

    model, model_dir = fitted
    # sentence-transformers runs the encoder in fp32; BertFlow.encode runs it in bf16 on CPUs with native bf16, so
    # the expected embeddings are those of the same model with the encoder in fp32.
    fp32 = BertFlow.load(model_dir)
    fp32.encoder.bf16 = False
    expected = fp32.encode(SENTENCES[:20])
    tolerance = dict(rtol=1e-4, atol=1e-5)
    st = to_sentence_transformer(model, device="cpu")
    np.testing.assert_allclose(st.encode(SENTENCES[:20]), expected, **tolerance)
    st.save(str(tmp_path / "st"))
    assert any(p.name == "model.safetensors" for p in (tmp_path / "st").rglob("*"))
    # Module classes outside sentence-transformers load only with trust_remote_code=True (flowkern's own code).
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu", trust_remote_code=True)
    np.testing.assert_allclose(reloaded.encode(SENTENCES[:20]), expected, **tolerance)


def test_predictor_adds_embeddings_to_a_batch(fitted):
    from flowkern.integrations.ray import BertFlowPredictor

    model, model_dir = fitted
    predictor = BertFlowPredictor(str(model_dir), column="sentence")
    out = predictor({"sentence": np.array(SENTENCES[:9]), "key": np.arange(9)})
    np.testing.assert_array_equal(out["key"], np.arange(9))
    np.testing.assert_allclose(out["embedding"], model.encode(SENTENCES[:9]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no column 'sentence'"):
        predictor({"text": np.array(["a"])})

