"""Flow layers as nn.Modules. Each layer: layer(x) -> (y, log_det[B]); layer.inverse(y) -> x."""
from .actnorm import ActNorm
from .coupling import AdditiveCoupling, AffineCoupling
from .glow import FlowStep, Glow
from .invconv import InvConv1x1
from .split import Split, Squeeze
from .subnets import ConvSubnet, MLPSubnet, ZeroConv2d, ZeroLinear
from .train_step import TrainStep

__all__ = ["ActNorm", "InvConv1x1", "AdditiveCoupling", "AffineCoupling", "Split", "Squeeze", "FlowStep", "Glow",
           "TrainStep", "MLPSubnet", "ConvSubnet", "ZeroLinear", "ZeroConv2d"]
