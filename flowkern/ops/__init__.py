"""Functional flow ops: each dispatches to the chosen backend (see flowkern.backend). Every kernel op is declared
once (flowkern.ops.spec.OpSpec), in the module of its family: <family>_ops.py, or the glow_ops package."""
from .actnorm_ops import actnorm, actnorm_inverse
from .coupling_epilogue_ops import coupling_epilogue, coupling_epilogue_inverse
from .glow_ops import glow, glow_inverse
from .invconv_ops import actnorm_invconv, invconv, invconv_inverse, lu_inverse_weight, lu_weight, permute_channels
from .mlp_coupling_ops import mlp_coupling, mlp_coupling_inverse
from .prior_ops import gaussian_log_prob
from .spec import MlpParams
from .split_ops import half, split_channels, squeeze2d, unsqueeze2d

__all__ = [
    "actnorm", "actnorm_inverse", "coupling_epilogue", "coupling_epilogue_inverse", "invconv", "invconv_inverse",
    "actnorm_invconv", "lu_weight", "lu_inverse_weight", "permute_channels", "mlp_coupling", "mlp_coupling_inverse",
    "MlpParams", "glow", "glow_inverse",
    "gaussian_log_prob", "half", "split_channels", "squeeze2d", "unsqueeze2d",
]
