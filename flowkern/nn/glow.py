"""FlowStep (ActNorm -> channel mixing -> coupling) and Glow (levels of steps with multi-scale splits), with the
choice between the fused whole-flow op, the per-op path and the reference."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from .. import backend, ops
from .._checks import compute_dtype
from ..ops.glow_ops import BACKENDS as GLOW_BACKENDS, GlowPlan, pack_forward, pack_inverse
from ..ops.mlp_coupling_ops import MAX_FUSED_HIDDEN
from .actnorm import ActNorm
from .coupling import AdditiveCoupling, AffineCoupling
from .invconv import MIXINGS, InvConv1x1
from .layer import FlowLayer
from .subnets import LOGSCALE_FACTOR, MLPSubnet

COUPLINGS = {"additive": AdditiveCoupling, "affine": AffineCoupling}


class FlowStep(FlowLayer):
    """ActNorm -> invertible 1x1 conv (or fixed permutation) -> coupling.

    x, y: [B, C] or [B, C, H, W] with C = channels; log_det [B] is the sum of the three layers' log-dets.
    With mixing="lu", ActNorm and the 1x1 conv run as one op (ops.actnorm_invconv: a single GEMM on kernel
    backends) once ActNorm is initialized; its data-dependent init runs on the unfused path.
    """

    def __init__(self, channels: int, hidden: int = 32, coupling: str = "additive", mixing: str = "reverse",
                 image: bool = False, subnet: nn.Module | None = None):
        super().__init__()
        if coupling not in COUPLINGS:
            raise ValueError(f"FlowStep: coupling must be one of {tuple(COUPLINGS)}, got {coupling!r}")
        self.channels = channels
        self.actnorm = ActNorm(channels)
        self.mixing = InvConv1x1(channels, mixing)
        self.coupling = COUPLINGS[coupling](channels, hidden, subnet=subnet, image=image)

    def _device_reference(self) -> torch.Tensor:   # a direct read: cheaper than walking parameters() per call
        return self.actnorm.bias

    def _forward(self, x: torch.Tensor):
        if self.mixing.mixing == "lu" and not self.actnorm.ddi_pending():
            # ActNorm folded into the 1x1 convolution (one GEMM); the ActNorm's DDI call takes the unfused path.
            weight, weight_log_det = self.mixing.weight()
            x, log_det = ops.actnorm_invconv(x, self.actnorm.bias, self.actnorm.logs, self.actnorm.logscale_factor,
                                             weight, weight_log_det)
        else:
            x, log_det = self.actnorm._forward(x)
            x, mixing_log_det = self.mixing._forward(x)
            log_det = log_det + mixing_log_det
        x, coupling_log_det = self.coupling._forward(x)
        return x, log_det + coupling_log_det

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm._inverse(self.mixing._inverse(self.coupling._inverse(y)))


class Glow(FlowLayer):
    """Multi-scale Glow: `levels` x `depth` FlowSteps, halving Split (N(0, I) prior) between levels.

    image=True: input [B, C, H, W], a 2x2 squeeze before each level and convolutional coupling nets, as in Glow.
    image=False (BERT-flow): input [B, C] (or [B, C, H, W] treated pixel-wise), MLP coupling nets, no squeeze.
    forward(x) -> (z, log_det): z has x's shape and holds concat(factored parts..., last level's output),
    flattened per sample; log_det excludes the prior. log_prob(x) = log N(z; 0, I) + log_det.

    Paths (`path_for(x)` says which a call takes): "fused" runs the whole flow as one op (flowkern.ops.glow: one
    kernel forward, one backward) for [B, C] input to a BERT-flow Glow (image=False, built-in MLP subnets,
    hidden <= 64) on a kernel backend, once every ActNorm is initialized; "ops" runs the per-op kernels layer
    by layer (image flows, user subnets, the data-dependent init call); "reference" the eager torch ops.
    Every call reads the parameters as they are then; `frozen()` opts into reusing their packing for inference.
    """

    def __init__(self, channels: int, levels: int = 3, depth: int = 3, hidden: int = 32,
                 coupling: str = "additive", mixing: str = "reverse", image: bool = False):
        super().__init__()
        if levels < 1 or depth < 1:
            raise ValueError(f"Glow: levels and depth must be >= 1, got levels={levels}, depth={depth}")
        if coupling not in COUPLINGS:
            raise ValueError(f"Glow: coupling must be one of {tuple(COUPLINGS)}, got {coupling!r}")
        if mixing not in MIXINGS:
            raise ValueError(f"Glow: mixing must be one of {MIXINGS}, got {mixing!r}")
        self.channels, self.image = channels, image
        self.config = dict(channels=channels, levels=levels, depth=depth, hidden=hidden, coupling=coupling,
                           mixing=mixing, image=image)
        self.level_channels = []
        c = channels
        for level in range(levels):
            c = c * 4 if image else c
            if c < 2:
                raise ValueError(f"Glow(channels={channels}, levels={levels}): level {level} would have {c} "
                                 f"channel(s); couplings need at least 2 (use fewer levels)")
            self.level_channels.append(c)
            c = ops.half(c)
        self.levels = nn.ModuleList(
            nn.ModuleList(FlowStep(c, hidden, coupling, mixing, image) for _ in range(depth))
            for c in self.level_channels)
        # Set to False to keep the per-op path (e.g. to compare the two); the fused path is used where it applies.
        self.fuse = True
        self._plans: dict[torch.device, GlowPlan] = {}
        self._frozen_packs: dict[tuple, tuple] | None = None   # packed parameters inside frozen(), else None
        self._fused_tree: _FusedTree | None = None
        # Permutation buffers may change with a checkpoint: rebuild the fused plan after loading one.
        self.register_load_state_dict_post_hook(_drop_plans)

    @classmethod
    def from_config(cls, config: dict, channels: int | None = None) -> "Glow":
        """Build from this class's own config or the original BERT-flow JSON keys
        (n_levels, depth, coupling_width, coupling, permutation)."""
        if "n_levels" in config:
            missing = [key for key in ("n_levels", "depth") if key not in config]
            if missing:
                raise ValueError(f"Glow.from_config: missing keys {missing} (the original config needs n_levels "
                                 f"and depth; coupling_width, coupling and permutation are optional)")
            mixing = "reverse" if config.get("permutation", True) else "lu"
            coupling = config.get("coupling", "additive")
            kwargs = dict(levels=config["n_levels"], depth=config["depth"],
                          hidden=config.get("coupling_width", 32), coupling=coupling, mixing=mixing)
        else:
            known = ("levels", "depth", "hidden", "coupling", "mixing", "image")
            unknown = set(config) - set(known) - {"channels"}
            if unknown:
                raise ValueError(f"Glow.from_config: unknown keys {sorted(unknown)}; expected {known} or the "
                                 f"original keys (n_levels, depth, coupling_width, coupling, permutation)")
            kwargs = {k: config[k] for k in known if k in config}
        channels = channels if channels is not None else config.get("channels")
        if channels is None:
            raise ValueError("Glow.from_config: the number of channels is not in the config; pass channels=")
        return cls(channels, **kwargs)

    def _device_reference(self) -> torch.Tensor:   # a direct read: cheaper than walking parameters() per call
        return self.levels[0][0].actnorm.bias

    def _check(self, x: torch.Tensor, where: str, inverse: bool = False) -> None:
        super()._check(x, where, inverse)
        if self.image:
            if x.dim() != 4:
                raise ValueError(f"{where}: image=True needs [B, C, H, W] input, got shape {tuple(x.shape)}")
            factor = 2 ** len(self.levels)
            if x.shape[2] % factor or x.shape[3] % factor:
                raise ValueError(f"{where}: height and width must be divisible by 2**levels = {factor}, "
                                 f"got shape {tuple(x.shape)}")

    # ---- which path a call takes ----

    def _tree(self) -> "_FusedTree":
        """What the fused path reads from the module tree, re-read whenever a submodule or parameter on its paths
        was replaced (checked per call: users may swap submodules)."""
        tree = self._fused_tree
        if tree is None or not tree.still_holds():
            tree = self._fused_tree = _FusedTree(self)
        return tree

    def _steps(self):
        return self._tree().steps

    def _fusable(self) -> bool:
        """Whether the structure fits the fused op."""
        return self._tree().fusable

    def _ddi_pending(self) -> bool:
        tree = self._tree()
        actnorms = tree.actnorms if tree.fusable else [m for m in self.modules() if isinstance(m, ActNorm)]
        return any(m.ddi_pending() for m in actnorms)

    def path_for(self, x: torch.Tensor) -> str:
        """"fused", "ops" or "reference": the path forward/log_prob/inverse take for input x (see the class doc;
        inverse additionally leaves the fused path when gradients are needed, which it does not compute)."""
        if backend.current() not in GLOW_BACKENDS + ("auto",):
            return "ops"    # a backend with per-op kernels only ("cuda": the whole Glow runs on Triton there)
        if backend.resolve(x, "glow", GLOW_BACKENDS) == "torch":
            return "reference"
        if self.fuse and x.dim() == 2 and self._fusable() and not self._ddi_pending():
            return "fused"
        return "ops"

    # ---- the fused path ----

    def _plan(self, device: torch.device) -> GlowPlan:
        plan = self._plans.get(device)
        if plan is None:
            steps = self._steps()
            perms = None if self.config["mixing"] == "lu" else [step.mixing.perm for step in steps]
            plan = GlowPlan(self.level_channels, self.config["depth"], self.config["hidden"],
                                    self.config["coupling"] == "affine", perms, LOGSCALE_FACTOR, device)
            self._plans[device] = plan
        return plan

    def _step_params(self) -> list[list[torch.Tensor]]:
        """Per step, the tensors of ops.glow.STEP_PARAMS (fusable structures only)."""
        return self._tree().step_params

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _packed(self, direction: str, plan: GlowPlan, x: torch.Tensor):
        """The packed parameters for ops.glow / ops.glow_inverse, from the parameters as they are now (whatever
        wrote them: an optimizer, load_state_dict, `.data`), except inside `frozen()`, where the first call's
        packing is reused for calls that need no gradient."""
        def pack():
            params = self._step_params()
            if direction == "forward":
                weights = [step.mixing.weight() for step in self._steps()] if plan.lu else None
                return pack_forward(plan, params, weights)
            weights = [step.mixing.inverse_weight() for step in self._steps()] if plan.lu else None
            return pack_inverse(plan, params, weights)

        if self._frozen_packs is None or self._needs_grad(x):
            return pack()
        key = (direction, plan.device)
        if key not in self._frozen_packs:
            params, *rest = pack()
            self._frozen_packs[key] = ([torch.cat([p.reshape(-1) for p in params])], *rest)
        return self._frozen_packs[key]

    @contextlib.contextmanager
    def frozen(self) -> Iterator["Glow"]:
        """Inside the block, calls without gradients (eval, no_grad) reuse the parameters packed by the first one.

        The fused path otherwise packs them on every call: a concatenation of ~100 small tensors, and for LU flows
        the [C, C] weight assembly (W = P L U, its inverse for `inverse`), which costs more than the flow itself at
        small batches on CPU. Use it for inference loops over a flow whose parameters the block does not change:
        a write to them inside the block (even through `.data`) is not seen until the block ends, except a
        load_state_dict. Blocks nest: an inner block's end leaves the outer one in force."""
        if self._frozen_packs is not None:   # nested: the outer block's packing stands until the outer block ends
            yield self
            return
        with contextlib.ExitStack() as mixings:   # the per-op path's LU weights too
            for module in self.modules():
                if isinstance(module, InvConv1x1):
                    mixings.enter_context(module.frozen())
            self._frozen_packs = {}
            try:
                yield self
            finally:
                self._frozen_packs = None

    def _fused_forward(self, x: torch.Tensor):
        """(z, log_det, log_prior) in one op."""
        plan = self._plan(x.device)
        params, mix, log_det_const = self._packed("forward", plan, x)
        return ops.glow(x, plan, params, mix, log_det_const)

    # ---- the maths of forward and inverse (FlowLayer checks the input first), log_prob ----

    def _forward(self, x: torch.Tensor):
        if self.path_for(x) == "fused":
            z, log_det, _ = self._fused_forward(x)
            return z, log_det
        return self._forward_layers(x)

    def _forward_layers(self, x: torch.Tensor):
        log_det = torch.zeros(x.shape[0], dtype=compute_dtype(x.dtype), device=x.device)
        factored = []
        h = x
        for i, steps in enumerate(self.levels):
            if self.image:
                h = ops.squeeze2d(h)
            for step in steps:
                h, step_log_det = step._forward(h)
                log_det = log_det + step_log_det
            if i < len(self.levels) - 1:
                h, out = ops.split_channels(h)
                factored.append(out)
        z = torch.cat([part.reshape(x.shape[0], -1) for part in factored + [h]], dim=1)
        return z.reshape(x.shape), log_det

    def _latent_shapes(self, shape: torch.Size):
        """Shapes of (factored parts..., last output) for an input of `shape`."""
        b, rest = shape[0], list(shape[2:])
        shapes = []
        for i, c in enumerate(self.level_channels):
            if self.image:
                rest = [rest[0] // 2, rest[1] // 2]
            if i < len(self.level_channels) - 1:
                shapes.append((b, c - ops.half(c), *rest))
            else:
                shapes.append((b, c, *rest))
        return shapes

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        if self.path_for(z) == "fused" and not self._needs_grad(z):
            plan = self._plan(z.device)
            return ops.glow_inverse(z, plan, *self._packed("inverse", plan, z))
        shapes = self._latent_shapes(z.shape)
        flat = z.reshape(z.shape[0], -1)
        sizes = [math.prod(s[1:]) for s in shapes]
        parts = [p.reshape(s) for p, s in zip(flat.split(sizes, dim=1), shapes)]
        h = parts[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                h = torch.cat([h, parts[i]], dim=1)
            for step in reversed(self.levels[i]):
                h = step._inverse(h)
            if self.image:
                h = ops.unsqueeze2d(h)
        return h

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per sample, [B]: N(0, I) prior of the latent plus the log-det of the flow (on the fused path,
        the prior comes from the same kernel)."""
        self._check(x, "Glow.log_prob")
        if self.path_for(x) == "fused":
            _, log_det, log_prior = self._fused_forward(x)
            return log_prior + log_det
        z, log_det = self._forward_layers(x)
        return ops.gaussian_log_prob(z) + log_det

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class _FusedTree:
    """The parts of a Glow's module tree the fused path reads: the steps, their parameter tensors in packing order,
    the ActNorms whose data-dependent init is pending or not, and whether the structure fits the fused op.

    Walking the tree per call (modules(), nn.Module.__getattr__ per tensor) costs more host time than the CPU
    kernels at batch 64, so it is read once, together with every (container, name) -> object link it went
    through; it stays valid while all of them still hold (still_holds: a dict lookup per link). Replacing a
    submodule or parameter on those paths makes the next call read the tree again."""

    def __init__(self, glow: Glow):
        self._links: list[tuple[dict, str, object]] = []
        levels = self._child(glow, "levels")
        self.steps = [self._child(level, key) for level in (self._child(levels, k) for k in list(levels._modules))
                      for key in list(level._modules)]
        self.step_params: list[list[torch.Tensor]] = []
        self.actnorms: list[ActNorm] = []
        self.fusable = not glow.image and glow.config["hidden"] <= MAX_FUSED_HIDDEN
        for step in self.steps:
            actnorm, coupling = self._child(step, "actnorm"), self._child(step, "coupling")
            net = self._child(coupling, "subnet")
            if not (self.fusable and coupling._builtin_mlp and type(net) is MLPSubnet):
                self.fusable = False
                break
            actnorm1, actnorm2 = self._child(net, "actnorm1"), self._child(net, "actnorm2")
            linear1, linear2, out = self._child(net, "linear1"), self._child(net, "linear2"), self._child(net, "out")
            if not (actnorm.logscale_factor == actnorm1.logscale_factor == actnorm2.logscale_factor
                    == LOGSCALE_FACTOR):
                self.fusable = False
                break
            self.actnorms += [actnorm, actnorm1, actnorm2]
            self.step_params.append([self._param(m, name) for m, name in (
                (actnorm, "bias"), (actnorm, "logs"), (linear1, "weight"), (actnorm1, "bias"), (actnorm1, "logs"),
                (linear2, "weight"), (actnorm2, "bias"), (actnorm2, "logs"), (out, "weight"), (out, "bias"),
                (out, "logs"))])

    def _child(self, parent: nn.Module, name: str) -> nn.Module:
        child = parent._modules[name]
        self._links.append((parent._modules, name, child))
        return child

    def _param(self, module: nn.Module, name: str) -> torch.Tensor:
        param = module._parameters[name]
        self._links.append((module._parameters, name, param))
        return param

    def still_holds(self) -> bool:
        return all(container.get(name) is value for container, name, value in self._links)


def _drop_plans(module: Glow, incompatible_keys) -> None:
    module._plans = {}
    if module._frozen_packs is not None:   # a checkpoint loaded inside frozen() is seen by the next call
        module._frozen_packs.clear()
