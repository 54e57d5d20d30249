import json
import math

import numpy as np
import pytest
import torch

from flowkern.data import fit_sentences, load_task
from flowkern.models import BertFlow, SentenceEncoder, evaluate_pairs
from flowkern.nn import Glow
from tests.models.tiny_bert import write_tiny_bert

SENTENCES = [f"{who} is {doing} {where}." for who in ("A man", "A woman", "The dog", "Two girls")
             for doing in ("playing", "running", "eating", "sitting") for where in ("on the beach", "in the snow")]


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return SentenceEncoder(tiny_bert, pooling="first-last-avg")


def small_flow(encoder, seed=0):
    return BertFlow(encoder, flow={"levels": 2, "depth": 2, "hidden": 16}, seed=seed)


def test_fit_reports_steps_and_lowers_the_loss(encoder):
    model = small_flow(encoder)
    report = model.fit(SENTENCES * 4, epochs=3, batch_size=16, lr=3e-3)
    assert report.path == "fast" and report.steps == 3 * math.ceil(len(SENTENCES) * 4 / 16) == len(report.losses)
    assert report.n_sentences == 128 and report.n_distinct == 32
    assert all(math.isfinite(x) for x in report.losses)
    assert np.mean(report.losses[-4:]) < np.mean(report.losses[:4]) - 0.1
    assert not model.flow.training


def test_fit_is_seeded(encoder):
    losses = [small_flow(encoder, seed=1).fit(SENTENCES, batch_size=8, seed=5).losses for _ in range(2)]
    assert losses[0] == losses[1]
    assert small_flow(encoder, seed=1).fit(SENTENCES, batch_size=8, seed=6).losses != losses[0]


def test_first_batch_initializes_actnorm_from_data(encoder):
    model = small_flow(encoder)
    model.fit(SENTENCES, batch_size=len(SENTENCES), lr=0.0, weight_decay=0.0)
    z = model.transform(model.pooled(SENTENCES))
    # with lr 0 the flow is its data-dependent init: the first ActNorm standardizes this very batch,
    # so the latent is centered (the couplings start at identity, mixing is a permutation).
    np.testing.assert_allclose(z.mean(0).cpu().numpy(), 0, atol=1e-4)


def test_encode_and_transform(encoder):
    model = small_flow(encoder)
    model.fit(SENTENCES, batch_size=16)
    embeddings = model.encode(SENTENCES[:5])
    assert isinstance(embeddings, np.ndarray) and embeddings.dtype == np.float32 and embeddings.shape == (5, 32)
    pooled = model.pooled(SENTENCES[:5])
    np.testing.assert_array_equal(model.transform(pooled.numpy()), embeddings)
    assert torch.equal(model.encode(SENTENCES[:5], as_tensor=True), model.transform(pooled))
    with pytest.raises(ValueError, match=r"\[N, 32\]"):
        model.transform(np.zeros((2, 31), np.float32))


def test_save_load_round_trip_gives_identical_embeddings(encoder, tmp_path):
    model = BertFlow(encoder, flow={"levels": 2, "depth": 2, "hidden": 16, "mixing": "lu", "coupling": "affine"})
    model.fit(SENTENCES, batch_size=16, lr=1e-2)
    model.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "flow.safetensors"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["pooling"] == "first-last-avg" and config["flow"]["mixing"] == "lu"
    loaded = BertFlow.load(tmp_path / "model")
    # Sentences neither encoder has cached, so both encode the very same batch.
    new = ["A fresh sentence about a horse.", "Another one about a bird in the snow.", "And a third."]
    np.testing.assert_array_equal(loaded.encode(new), model.encode(new))
    pooled = model.pooled(SENTENCES)
    assert torch.equal(loaded.transform(pooled), model.transform(pooled))


def test_load_rejects_a_foreign_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertFlow.load(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a flowkern.bertflow"):
        BertFlow.load(tmp_path)


def test_accepts_original_config_keys_and_glow_instances(encoder):
    original = BertFlow(encoder, flow={"n_levels": 2, "depth": 3, "coupling_width": 16, "coupling": "additive",
                                       "permutation": True})
    assert original.flow.config["levels"] == 2 and original.flow.config["mixing"] == "reverse"
    glow = Glow(encoder.dim, levels=1, depth=1)
    assert BertFlow(encoder, flow=glow).flow is glow
    with pytest.raises(ValueError, match="the flow has 16 channels"):
        BertFlow(encoder, flow=Glow(16))


def test_empty_corpus_is_an_error(encoder):
    with pytest.raises(ValueError, match="empty corpus"):
        small_flow(encoder).fit([])


def test_non_finite_loss_stops_with_the_step(encoder, monkeypatch):
    model = small_flow(encoder)
    calls = {"n": 0}
    log_prob = model.flow.log_prob

    def failing_on_third_step(x):
        calls["n"] += 1
        out = log_prob(x)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(model.flow, "log_prob", failing_on_third_step)
    with pytest.raises(FloatingPointError, match="at step 3 "):
        model.fit(SENTENCES, batch_size=8)


@pytest.fixture(scope="module")
def stsb_subset(sts_data_dir):
    return load_task("stsb", sts_data_dir, max_pairs=300), fit_sentences("stsb", "target", sts_data_dir, max_pairs=300)


def fast_and_eager_scores(encoder, stsb_subset, seed, epochs):
    pairs, corpus = stsb_subset
    scores, losses = [], []
    for reference in (False, True):
        model = BertFlow(encoder, seed=seed)
        report = model.fit(corpus, epochs=epochs, seed=seed, reference=reference)
        assert report.path == ("eager" if reference else "fast")
        scores.append(evaluate_pairs(model.encode, pairs).all)
        losses.append(report.losses)
    return scores, losses


def test_fast_and_eager_paths_match_without_dropout(tmp_path_factory, stsb_subset):
    # Without dropout the two paths differ only in padding and backend: same batches, same updates.
    encoder = SentenceEncoder(write_tiny_bert(tmp_path_factory.mktemp("no-dropout"), dropout=0.0))
    (fast, eager), (fast_losses, eager_losses) = fast_and_eager_scores(encoder, stsb_subset, seed=0, epochs=1)
    np.testing.assert_allclose(eager_losses, fast_losses, atol=1e-3)
    assert abs(fast - eager) < 0.05


def test_fast_and_eager_paths_agree_with_dropout(encoder, stsb_subset):
    # Dropout makes the eager path fit noisier embeddings; seed to seed either path moves by about 1
    # point on this tiny model, so the comparison is over the mean of three seeds.
    gaps = [fast - eager for (fast, eager), _ in
            (fast_and_eager_scores(encoder, stsb_subset, seed=seed, epochs=3) for seed in range(3))]
    assert abs(np.mean(gaps)) < 0.5, gaps


def test_a_str_is_one_sentence(encoder):
    model = small_flow(encoder)
    one = model.encode("A man is playing.")
    assert one.shape == (encoder.dim,)
    np.testing.assert_array_equal(one, model.encode(["A man is playing."])[0])
    assert model.pooled("A man is playing.").shape == (encoder.dim,)


def test_fit_needs_two_sentences(encoder):
    for corpus in (["A man is playing."], "A man is playing."):
        with pytest.raises(ValueError, match="need at least 2 sentences to fit the flow, got 1"):
            small_flow(encoder).fit(corpus)


def test_saved_files_share_one_mode(encoder, tmp_path):
    small_flow(encoder).save(tmp_path / "model")
    modes = {(tmp_path / "model" / name).stat().st_mode for name in ("config.json", "flow.safetensors")}
    assert len(modes) == 1


def test_damaged_weights_and_a_config_that_does_not_match_them_are_named(encoder, tmp_path):
    small_flow(encoder).save(tmp_path / "model")
    weights = tmp_path / "model" / "flow.safetensors"
    intact = weights.read_bytes()
    for damaged in (intact[:len(intact) // 2], b"\xff" * 64):
        weights.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"flow.safetensors: damaged, not readable as safetensors .*; save the "
                                             r"model again"):
            BertFlow.load(tmp_path / "model")
    weights.write_bytes(intact)
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["flow"]["hidden"] = 24
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"flow.safetensors does not match .*config.json .*: \d+ tensors of another "
                                         r"shape \(first \S+: \[\d+(, \d+)*\] saved, \[\d+(, \d+)*\] expected\)$"):
        BertFlow.load(tmp_path / "model")
    config["flow"]["depth"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensors missing \(first "):
        BertFlow.load(tmp_path / "model")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="flow.safetensors is missing"):
        BertFlow.load(tmp_path / "model")


def test_quantize_is_a_load_time_option_not_saved(encoder, tiny_bert, tmp_path):
    model = small_flow(encoder)
    model.fit(SENTENCES, batch_size=16)
    model.save(tmp_path / "flow")
    assert "quantize" not in json.loads((tmp_path / "flow" / "config.json").read_text())
    int8 = BertFlow.load(tmp_path / "flow", device="cpu", quantize="int8")
    assert int8.encoder.quantize == "int8" and BertFlow.load(tmp_path / "flow").encoder.quantize is None
    assert BertFlow(tiny_bert, device="cpu", quantize="int8").encoder.quantize == "int8"
    cosine = torch.nn.functional.cosine_similarity(int8.encode(SENTENCES, as_tensor=True),
                                                   model.encode(SENTENCES, as_tensor=True))
    assert cosine.min() > 0.9
    with pytest.raises(ValueError, match="quantize= applies to an encoder built here"):
        BertFlow(encoder, quantize="int8")
    with pytest.raises(ValueError, match="unknown quantize 'fp8'"):
        BertFlow.load(tmp_path / "flow", quantize="fp8")
