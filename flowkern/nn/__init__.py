"""Flow layers as nn.Modules. Each layer (a FlowLayer): layer(x) -> (y, log_det[B]); layer.inverse(y) -> x.

x and y are float [B, C] or [B, C, H, W]; log_det is log |det dy/dx| per sample, float32 (float64 for float64 input).
FlowLayer checks the input once per call; the subnets and TrainStep are the layers' helpers, not flow layers.
"""
from .actnorm import ActNorm
from .coupling import AdditiveCoupling, AffineCoupling
from .glow import FlowStep, Glow
from .invconv import InvConv1x1
from .layer import FlowLayer
from .split import Split, Squeeze
from .subnets import ConvSubnet, MLPSubnet, ZeroConv2d, ZeroLinear
from .train_step import TrainStep

__all__ = ["FlowLayer", "ActNorm", "InvConv1x1", "AdditiveCoupling", "AffineCoupling", "Split", "Squeeze", "FlowStep",
           "Glow", "TrainStep", "MLPSubnet", "ConvSubnet", "ZeroLinear", "ZeroConv2d"]
