"""flowkern: fused normalizing-flow layers (Glow / BERT-flow) with eager, Triton and compiled backends."""
from ._checks import set_finite_checks
from .backend import backends, current as current_backend, set_backend, use_backend
from .nn.train_step import TrainStep

__version__ = "0.1.0"

__all__ = ["backends", "set_backend", "use_backend", "current_backend", "set_finite_checks", "TrainStep",
           "__version__"]
