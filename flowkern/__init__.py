"""flowkern: fused normalizing-flow layers (Glow / BERT-flow) with eager, Triton and compiled backends."""
from ._checks import set_finite_checks
from .backend import backends, current as current_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["backends", "set_backend", "use_backend", "current_backend", "set_finite_checks", "__version__"]
