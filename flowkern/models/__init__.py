"""User-facing models: BertFlow (encoder + pooling + flow), the whitening baseline, STS evaluation.

Needs the install extra `flowkern[bertflow]`; flowkern.nn and flowkern.ops below do not.
"""
from flowkern._extras import require_extra

require_extra("bertflow", "flowkern.models", "numpy", "scipy", "safetensors", "tqdm", "transformers")

from flowkern.models.bertflow import BertFlow, FitReport, bits_per_dim
from flowkern.models.encoder import EMBEDDED_ENCODER, POOLINGS, SentenceEncoder, pool
from flowkern.models.evaluate import TaskScore, evaluate, evaluate_pairs, spearman_cosine
from flowkern.models.whitening import Whitening

__all__ = [
    "EMBEDDED_ENCODER",
    "POOLINGS",
    "BertFlow",
    "FitReport",
    "SentenceEncoder",
    "TaskScore",
    "Whitening",
    "bits_per_dim",
    "evaluate",
    "evaluate_pairs",
    "pool",
    "spearman_cosine",
]
