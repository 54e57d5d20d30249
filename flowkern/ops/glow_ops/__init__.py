"""The whole [B, C] Glow of the BERT-flow family as one op: every level, step and split, plus the N(0, I) prior.

Covers Glows built from ActNorm -> mixing (a fixed permutation, or LU weights) -> coupling (additive or affine)
with the built-in MLP subnet (flowkern.nn.subnets.MLPSubnet, hidden <= 64), halving splits between levels.
`nn.Glow` builds a `GlowPlan` once (plan.py: which channel plays which role at each step, as tables every backend
reads) and packs its parameters per call (`pack_forward`, `pack_inverse`); `glow` and `glow_inverse` (op.py) then
run the whole flow:
  - "triton": one kernel forward, one inverse, one backward (flowkern/kernels/triton/glow.py);
  - "cpp": the same on the CPU (csrc/cpu/glow.cpp);
  - "torch": `glow_ref` / `glow_inverse_ref` (reference.py), eager torch on the same packed parameters.
LU flows fold each ActNorm into the step's W on the host (W diag(s) and W (b s), tiny [C, C] ops that autograd
differentiates), so the kernels see one affine map per step; their constant log-det (sum log|s_W| + f sum logs)
is added on the host as well.
"""
from .op import BACKENDS, glow, glow_inverse, mix_gradient
from .plan import STEP_PARAMS, GlowPlan, GlowTables, pack_forward, pack_inverse
from .reference import glow_inverse_ref, glow_ref

__all__ = ["BACKENDS", "STEP_PARAMS", "GlowPlan", "GlowTables", "glow", "glow_inverse", "glow_inverse_ref",
           "glow_ref", "mix_gradient", "pack_forward", "pack_inverse"]
