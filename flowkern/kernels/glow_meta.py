"""Columns of the fused Glow's per-step meta table (int64 [steps, COUNT]), named in this one place: the ops build
the table by these names (flowkern.ops.glow_ops.plan), the Triton kernels read it by them
(flowkern/kernels/triton/glow.py), and tests/ops/test_glow.py checks csrc/cpu/glow.cpp's `enum Meta` against them.
"""
# Offsets into the packed parameters (ops.glow_ops.STEP_PARAMS; -1 for the ActNorm pair of LU flows, folded into W).
OFF_ACTNORM_BIAS = 0
OFF_ACTNORM_LOGS = 1
OFF_W1 = 2
OFF_B1 = 3
OFF_L1 = 4
OFF_W2 = 5
OFF_B2 = 6
OFF_L2 = 7
OFF_W3 = 8
OFF_B3 = 9
OFF_L3 = 10
# Offsets into the LU flows' mixing buffer: the folded W [CL, CL] and bias [CL] (-1 for permutation flows).
OFF_MIX_W = 11
OFF_MIX_B = 12
C1 = 13          # the coupling's conditioning channels
CL = 14          # the level's channels
Z_OFFSET = 15    # first z column of the channels the level factors out (its remaining channels' at the last level)
COUNT = 16

