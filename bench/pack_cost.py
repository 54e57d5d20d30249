"""What reading the parameters on every call costs nn.Glow's fused path on CPU: eval calls packing the parameters
per call (the default) against the same calls inside `flow.frozen()` (packed once).

    python bench/pack_cost.py [--batch 64] [--repeats 3]

Glow(768, levels=3, depth=3, hidden=32), additive+reverse (BERT-flow) and affine+LU, forward and inverse, on the
backend "auto" picks for CPU tensors; prints medians of 40 calls, `repeats` times alternating the two modes.
"""
from __future__ import annotations

import argparse

import torch

from flowkern import backend
from flowkern.bench.timer import Timer
from flowkern.nn import Glow
from flowkern.ops.glow_ops import BACKENDS as GLOW_BACKENDS

CALLS = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    timer = Timer("cpu", warmup_ms=0, min_reps=CALLS, max_reps=CALLS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for coupling, mixing in [("additive", "reverse"), ("affine", "lu")]:
        flow = Glow(768, 3, 3, 32, coupling=coupling, mixing=mixing)
        flow(torch.randn(256, 768))   # ActNorm's data-dependent init
        flow.eval()
        x = torch.randn(args.batch, 768)
        where = f"{flow.path_for(x)} path, {backend.resolve(x, 'glow', GLOW_BACKENDS)} backend"
        with torch.no_grad():
            for direction, call in [("forward", lambda: flow(x)), ("inverse", lambda: flow.inverse(x))]:
                runs = []
                for _ in range(args.repeats):
                    per_call = timer.median_ms(call)
                    with flow.frozen():
                        frozen = timer.median_ms(call)
                    runs.append(f"{per_call:.2f} vs {frozen:.2f} ms")
                print(f"{coupling}+{mixing} {direction} ({where}): packed per call vs frozen: {'; '.join(runs)}")


if __name__ == "__main__":
    main()
