import pytest
import torch

from flowkern.models import SentenceEncoder, pool
from flowkern.models.encoder import masked_mean

SENTENCES = ["A man is playing a flute.", "Two dogs run on the beach in the snow near the road.", "A cat.",
             "A man is playing a flute."]


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return SentenceEncoder(tiny_bert, pooling="first-last-avg")


def hidden_and_mask(layers=4, batch=3, tokens=5, dim=6):
    hidden = tuple(torch.randn(batch, tokens, dim) for _ in range(layers + 1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    return hidden, mask


def test_masked_mean_ignores_padding():
    hidden, mask = hidden_and_mask()
    expected = torch.stack([hidden[-1][i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(masked_mean(hidden[-1], mask), expected)


def test_poolings_compute_what_they_are_named_for():
    hidden, mask = hidden_and_mask()
    mean = lambda layer: masked_mean(hidden[layer], mask)  # noqa: E731
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[-1][:, 0])
    torch.testing.assert_close(pool(hidden, mask, "mean"), mean(-1))
    torch.testing.assert_close(pool(hidden, mask, "last2avg"), (mean(-1) + mean(-2)) / 2)
    torch.testing.assert_close(pool(hidden, mask, "first-last-avg"), (mean(1) + mean(-1)) / 2)
    torch.testing.assert_close(pool(hidden, mask, "mean-last-3"), (mean(-1) + mean(-2) + mean(-3)) / 3)
    torch.testing.assert_close(pool(hidden, mask, "mean-last-1"), mean(-1))


def test_bad_poolings():
    hidden, mask = hidden_and_mask(layers=4)
    with pytest.raises(ValueError, match="needs 5 layers"):
        pool(hidden, mask, "mean-last-5")
    for name in ("max", "mean-last-0", "mean-last-"):
        with pytest.raises(ValueError, match="unknown pooling"):
            pool(hidden, mask, name)


def test_encode_is_independent_of_batch_padding(encoder):
    alone = torch.cat([encoder.pool_batch([s]) for s in SENTENCES])
    together = encoder.pool_batch(SENTENCES)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_encode_dedupes_and_keeps_input_order(encoder, monkeypatch):
    batches = []
    original = encoder.pool_tokens
    decode = encoder.tokenizer.decode

    def recording(input_ids, attention_mask):
        batches.append(tuple(decode(row[mask.bool()], skip_special_tokens=True)
                             for row, mask in zip(input_ids, attention_mask)))
        return original(input_ids, attention_mask)

    monkeypatch.setattr(encoder, "pool_tokens", recording)
    fresh = ["unseen sentence number one", "unseen two", "unseen sentence number one"]
    out = encoder.encode(fresh, batch_size=1)
    assert out.shape == (3, encoder.dim) and out.dtype == torch.float32
    assert sorted(batches) == [("unseen sentence number one",), ("unseen two",)]
    assert torch.equal(out[0], out[2])
    encoder.encode(fresh)
    assert len(batches) == 2  # served from the memory cache


def test_reference_batches_use_dropout_and_restore_eval_mode(encoder):
    first, second = (encoder.pool_batch(SENTENCES, reference=True) for _ in range(2))
    assert not torch.allclose(first, second)
    assert not encoder.model.training
    assert torch.equal(encoder.pool_batch(SENTENCES), encoder.pool_batch(SENTENCES))


def test_disk_cache_is_reused_by_a_new_encoder(tiny_bert, tmp_path, monkeypatch):
    first = SentenceEncoder(tiny_bert, pooling="mean", cache_dir=tmp_path)
    expected = first.encode(SENTENCES)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    second = SentenceEncoder(tiny_bert, pooling="mean", cache_dir=tmp_path)
    monkeypatch.setattr(second, "pool_batch", lambda *a, **k: pytest.fail("should come from the disk cache"))
    assert torch.equal(second.encode(SENTENCES), expected)
    other_pooling = SentenceEncoder(tiny_bert, pooling="cls", cache_dir=tmp_path)
    other_pooling.encode(SENTENCES)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_max_length_truncates(tiny_bert):
    short = SentenceEncoder(tiny_bert, pooling="mean", max_length=4)
    long_sentence = "a man " * 50
    torch.testing.assert_close(short.pool_batch([long_sentence]), short.pool_batch(["a man a man"]))
