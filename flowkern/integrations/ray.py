"""Ray Data: embed a dataset's text column across a cluster with a saved BertFlow.

    import ray
    from flowkern.integrations.ray import BertFlowPredictor
    ds = ray.data.read_parquet("s3://corpus/").map_batches(
        BertFlowPredictor, fn_constructor_kwargs={"model_dir": "model/", "column": "text"},
        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=4096, batch_format="numpy")

The model is loaded once per actor; each batch of texts goes through the same token batching as `flowkern embed`
(length-sorted token-budget batches, flow on the device). Ray itself is only needed by the caller.
"""
from __future__ import annotations

import numpy as np

from flowkern.embed.job import Embedder


class BertFlowPredictor:
    """A callable class for `Dataset.map_batches`: {column: texts, ...} -> the same batch plus `output_column`
    ([rows, D] float32 embeddings; pooled=True: the encoder's pooled vectors, no flow)."""

    def __init__(self, model_dir: str, column: str = "text", output_column: str = "embedding",
                 pooled: bool = False, device: str | None = None, batch_tokens: int | None = None):
        from flowkern.models import BertFlow

        self.column, self.output_column = column, output_column
        self.embedder = Embedder(BertFlow.load(model_dir, device=device), pooled=pooled, batch_tokens=batch_tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise ValueError(f"BertFlowPredictor: the batch has no column {self.column!r} "
                             f"(has {sorted(batch)}); pass column=")
        texts = [str(text) for text in batch[self.column]]
        return {**batch, self.output_column: self.embedder(texts)}
