"""sentence-transformers modules for a fitted BertFlow: its pooling and its flow, so that a SentenceTransformer
encodes, saves (safetensors) and loads with the flow. Optional dependency: pip install 'flowkern[st]'.

    from flowkern.integrations.sentence_transformers import to_sentence_transformer
    st = to_sentence_transformer(BertFlow.load("model/"))   # Transformer -> BertFlowPooling -> BertFlowModule
    st.encode(["A man plays a flute."]); st.save("st-model/")
    SentenceTransformer("st-model/", trust_remote_code=True)   # modules from outside sentence-transformers
"""
from __future__ import annotations

from typing import Any

import torch

from flowkern._extras import require_extra

require_extra("st", "flowkern.integrations.sentence_transformers", "sentence_transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402  (after the check naming the extra)
from sentence_transformers.base.modules import Module, Transformer

from flowkern.models import BertFlow
from flowkern.models.encoder import check_pooling, pool
from flowkern.nn import Glow


class BertFlowPooling(Module):
    """BertFlow's poolings (first-last-avg, last2avg, mean-last-N, mean, cls) from the Transformer module's
    all_layer_embeddings (its model config needs output_hidden_states=True)."""

    config_keys = ["pooling"]

    def __init__(self, pooling: str = "first-last-avg"):
        super().__init__()
        self.pooling = check_pooling(pooling)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        if "all_layer_embeddings" not in features:
            raise ValueError("BertFlowPooling needs all_layer_embeddings: build the Transformer module with "
                             "config_kwargs={'output_hidden_states': True}")
        features["sentence_embedding"] = pool(features["all_layer_embeddings"], features["attention_mask"],
                                              self.pooling)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)


class BertFlowModule(Module):
    """The fitted Glow applied to `sentence_embedding` (float32 in, float32 out; no gradient)."""

    config_keys = ["flow_config"]

    def __init__(self, flow_config: dict):
        super().__init__()
        self.flow_config = dict(flow_config)
        self.flow = Glow.from_config(self.flow_config).eval()

    @classmethod
    def from_flow(cls, flow: Glow) -> "BertFlowModule":
        module = cls(flow.config)
        module.flow.load_state_dict(flow.state_dict())
        return module

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        with torch.no_grad():
            z, _ = self.flow(features["sentence_embedding"].float())
        features["sentence_embedding"] = z
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs) -> "BertFlowModule":
        hub = dict(subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
                   local_files_only=local_files_only)
        module = cls(**cls.load_config(model_name_or_path, **hub))
        cls.load_torch_weights(model_name_or_path, model=module, **hub)
        module.flow.eval()
        return module


def to_sentence_transformer(model: BertFlow, device: str | torch.device | None = None) -> SentenceTransformer:
    """A SentenceTransformer computing the same embeddings as model.encode: the encoder (with hidden states),
    BertFlow's pooling, then the flow."""
    encoder = model.encoder
    transformer = Transformer(encoder._source, max_seq_length=encoder.max_length,
                              config_kwargs={"output_hidden_states": True})
    modules = [transformer, BertFlowPooling(encoder.pooling), BertFlowModule.from_flow(model.flow)]
    return SentenceTransformer(modules=modules, device=str(device or encoder.device))
