"""A tiny randomly initialised BertModel + WordPiece tokenizer written to disk, loaded by the real code."""

from __future__ import annotations

import json
import string
from pathlib import Path

# Common words of the STS sentences, so that a random bag-of-embeddings model already tracks word overlap;
# any other word falls back to single-character WordPiece pieces.
WORDS = """the a an is are was were be to of and in on at with for by from man woman men women person people
boy girl child children dog cat horse bird animal playing plays play riding rides ride running runs run
walking walks walk eating eats eat cutting cuts cut cooking slicing dancing singing swimming sitting standing
jumping driving car bike ball guitar piano flute water grass street field beach snow road table food onion
potato meat egg tomato hat shirt red black white blue green two three some his her their it its this that
there into up down over under near not no new said says say year years percent police president state
killed attack he she they we you i what how who which when where why do does did has have had
young old large small big little""".split()

TINY_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=80)


def write_tiny_bert(directory: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """Save a random BertModel and a lower-casing WordPiece tokenizer (vocab.txt) to ``directory``."""
    import torch
    from transformers import BertConfig, BertModel

    characters = string.ascii_lowercase + string.digits
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(characters + string.punctuation)
             + [f"##{c}" for c in characters] + sorted(set(WORDS)))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 80}),
        encoding="utf-8")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(BertConfig(vocab_size=len(vocab), hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout, **TINY_CONFIG))
    model.save_pretrained(directory)
    return directory
