"""The offline embedding job: `flowkern embed` / `flowkern.embed.embed`, and reading its output."""
from flowkern.embed.job import DEFAULT_SHARD_ROWS, EmbedReport, Embedder, embed, read_output

__all__ = ["DEFAULT_SHARD_ROWS", "EmbedReport", "Embedder", "embed", "read_output"]
