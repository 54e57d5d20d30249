"""Integrations with other libraries, each an optional dependency imported only by its own module:
flowkern.integrations.sentence_transformers (SentenceTransformer modules) and flowkern.integrations.ray
(a Ray Data predictor)."""
