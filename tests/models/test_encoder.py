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


@pytest.mark.parametrize("bf16, tolerance", [(False, 1e-5), (True, 2e-3)])
def test_encode_is_independent_of_batch_padding(tiny_bert, bf16, tolerance):
    encoder = SentenceEncoder(tiny_bert, pooling="first-last-avg", device="cpu")
    encoder.bf16 = bf16   # bf16: a padded batch changes the attention's rounding, within bf16's precision
    alone = torch.cat([encoder.pool_batch([s]) for s in SENTENCES])
    together = encoder.pool_batch(SENTENCES)
    torch.testing.assert_close(together, alone, atol=tolerance, rtol=tolerance)


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


def _tokens(encoder, sentences=SENTENCES):
    batch = encoder.tokenizer(sentences, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def test_bf16_on_cpu_runs_a_bf16_copy_close_to_autocast_and_fp32(tiny_bert, monkeypatch):
    encoder = SentenceEncoder(tiny_bert, pooling="first-last-avg", device="cpu")
    encoder.bf16 = True   # also on CPUs without native bf16, where it is only slower
    tokens = _tokens(encoder)
    copied = encoder.pool_tokens(*tokens)
    fast = encoder._fast_model()
    assert fast is not encoder.model and fast is encoder._fast_model()   # made once
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16} and fast.pooler is None
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float32} and encoder.model.pooler is not None
    assert copied.dtype == torch.float32
    with monkeypatch.context() as patch:   # the previous path: the fp32 model under bf16 autocast
        patch.setattr(encoder, "_fast_model", lambda: encoder.model)
        autocast = encoder.pool_tokens(*tokens)
    torch.testing.assert_close(copied, autocast, atol=3e-2, rtol=3e-2)
    encoder.bf16 = False
    assert encoder._fast_model() is encoder.model
    torch.testing.assert_close(copied, encoder.pool_tokens(*tokens), atol=3e-2, rtol=3e-2)


def test_fast_copy_follows_a_replaced_model(tiny_bert):
    encoder = SentenceEncoder(tiny_bert, pooling="mean", device="cpu")
    encoder.bf16 = True
    first = encoder._fast_model()
    replacement = SentenceEncoder(tiny_bert, pooling="mean", device="cpu").model
    with torch.no_grad():
        replacement.encoder.layer[-1].output.dense.weight.mul_(2)
    encoder.model = replacement
    assert encoder._fast_model() is not first
    torch.testing.assert_close(encoder._fast_model().encoder.layer[-1].output.dense.weight,
                               replacement.encoder.layer[-1].output.dense.weight.bfloat16())


def test_int8_quantizes_the_linear_layers_of_a_copy_without_warnings(tiny_bert, recwarn):
    fp32 = SentenceEncoder(tiny_bert, pooling="first-last-avg", device="cpu")
    fp32.bf16 = False
    int8 = SentenceEncoder(tiny_bert, pooling="first-last-avg", device="cpu", quantize="int8")
    assert int8.quantize == "int8" and not int8.bf16
    tokens = _tokens(int8)
    quantized = int8.pool_tokens(*tokens)
    fast = int8._fast_model()
    kinds = {type(m).__name__ for m in fast.modules()}
    assert "Linear" in kinds and not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert any(type(m) is torch.nn.Linear for m in int8.model.modules())   # the model itself stays fp32
    assert not [w for w in recwarn if issubclass(w.category, (DeprecationWarning, UserWarning))]
    reference = fp32.pool_tokens(*tokens)
    assert not torch.equal(quantized, reference)
    assert torch.nn.functional.cosine_similarity(quantized, reference).min() > 0.98
    # The eager (reference) path runs the fp32 model, dropout on, as without quantization.
    assert not int8.model.training and int8.pool_batch(SENTENCES, reference=True).shape == (4, int8.dim)


def test_quantize_errors_name_the_problem(tiny_bert):
    with pytest.raises(ValueError, match=r"unknown quantize 'int4'; choose one of int8"):
        SentenceEncoder(tiny_bert, device="cpu", quantize="int4")
    with pytest.raises(ValueError, match=r"runs on the CPU only; the encoder is on cuda"):
        SentenceEncoder(tiny_bert, device="cuda", quantize="int8")   # refused before anything is loaded


def test_disk_cache_keeps_int8_apart(tiny_bert, tmp_path):
    SentenceEncoder(tiny_bert, pooling="mean", device="cpu", cache_dir=tmp_path).encode(SENTENCES)
    SentenceEncoder(tiny_bert, pooling="mean", device="cpu", cache_dir=tmp_path, quantize="int8").encode(SENTENCES)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_local_first_fetches_only_when_the_hub_answers(monkeypatch):
    from flowkern.models import encoder as encoder_module

    calls = []

    def load(local_files_only):
        calls.append(local_files_only)
        if local_files_only:
            raise OSError("not in the cache")
        return "fetched"

    monkeypatch.setattr(encoder_module, "_hub_reachable", lambda: True)
    assert encoder_module.local_first(load, "some/model") == "fetched" and calls == [True, False]
    monkeypatch.setattr(encoder_module, "_hub_reachable", lambda: False)
    with pytest.raises(OSError, match=r"^encoder 'some/model' is not in the local HuggingFace cache"):
        encoder_module.local_first(load, "some/model")
    assert calls == [True, False, True]
