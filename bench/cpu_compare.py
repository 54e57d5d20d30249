"""CPU: the compiled "cpp" backend against the eager "torch" backend, measured in one run (medians).

    python bench/cpu_compare.py [--quick] [--fit] [--json bench/results/cpu.json]

Rows: the whole Glow(768, 3, 3, 32) (additive + reverse, BERT-flow's default; and affine + LU) in inference at
B = 64 and 4096 and as a TrainStep at B = 64; each op forward+backward at [4096, 768]; with --fit (needs the STS
data: FLOWKERN_DATA or ../shared/data/sts) the flow phase of BertFlow.fit on STS-B test sentences (all-MiniLM-L6-v2,
one epoch, batch 64) on each backend. Prints a table with the machine, versions and thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import flowkern
from flowkern import TrainStep, nn, ops
from flowkern.bench.timer import Timer

BACKENDS = ("torch", "cpp")


def _glow(coupling: str, mixing: str) -> nn.Glow:
    torch.manual_seed(0)
    flow = nn.Glow(768, 3, 3, 32, coupling, mixing)
    flow(torch.randn(256, 768))   # the data-dependent ActNorm init, outside the timings
    return flow


def _whole_flow_cases(quick: bool):
    for coupling, mixing in [("additive", "reverse"), ("affine", "lu")]:
        for batch in ((4096,) if quick else (64, 4096)):
            flow = _glow(coupling, mixing).eval()
            x = torch.randn(batch, 768)

            def infer(flow=flow, x=x):
                with torch.no_grad():
                    flow.log_prob(x)
            yield f"Glow {coupling}+{mixing} log_prob, B={batch}", infer
        flow = _glow(coupling, mixing)
        x = torch.randn(64, 768)
        # AdamW as BertFlow.fit builds it on CPU (fused), the same for both backends.
        optimizer = torch.optim.AdamW(flow.parameters(), lr=1e-4, weight_decay=0.01, eps=1e-6, fused=True)
        step = TrainStep(flow, optimizer, loss="bits_per_dim")
        yield f"Glow {coupling}+{mixing} TrainStep, B=64", lambda step=step, x=x: step(x)


def _forward_backward(fn, *inputs):
    inputs = [t.requires_grad_() for t in inputs]

    def run():
        outputs = [o for o in fn(*inputs) if o.requires_grad]
        torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs], allow_unused=True)
    return run


def _op_cases():
    b, c, h = 4096, 768, 32
    x, bias, logs = torch.randn(b, c), torch.randn(c), 0.1 * torch.randn(c)
    yield "actnorm fwd+bwd [4096, 768]", _forward_backward(lambda *t: ops.actnorm(*t, 3.0), x, bias, logs)
    x2 = torch.randn(b, c // 2)
    yield "coupling_epilogue additive fwd+bwd", _forward_backward(
        lambda a, g: ops.coupling_epilogue(a, g, False), x2, torch.randn(b, c // 2))
    yield "coupling_epilogue affine fwd+bwd", _forward_backward(
        lambda a, g: ops.coupling_epilogue(a, g, True), x2.clone(), torch.randn(b, c))
    yield "gaussian_log_prob fwd+bwd", _forward_backward(lambda z: (ops.gaussian_log_prob(z),), torch.randn(b, c))
    weights = [0.1 * torch.randn(h, c // 2), torch.randn(h), 0.1 * torch.randn(h), 0.1 * torch.randn(h, h),
               torch.randn(h), 0.1 * torch.randn(h), 0.1 * torch.randn(c, h), torch.randn(c), 0.1 * torch.randn(c)]
    yield "mlp_coupling affine fwd+bwd", _forward_backward(
        lambda x1, x2, *w: ops.mlp_coupling(x1, x2, ops.MlpParams(*w), True, 3.0), torch.randn(b, c // 2),
        torch.randn(b, c // 2), *weights)
    perm = torch.randperm(c)
    factors = [0.01 * torch.randn(c, c), 0.01 * torch.randn(c, c), torch.ones(c), 0.01 * torch.randn(c)]
    yield "lu_weight fwd+bwd [768, 768]", _forward_backward(
        lambda lower, upper, log_s: ops.lu_weight(perm, lower, upper, factors[2], log_s),
        factors[0], factors[1], factors[3])


def _fit_rows(data_dir: Path) -> list[dict]:
    from flowkern.data import load_task
    from flowkern.models import BertFlow

    sentences = load_task("stsb", data_dir).sentences()
    model = BertFlow()
    model.pooled(sentences)   # fill the encoder's cache: both fits below time the flow phase only
    rows = []
    for name in BACKENDS:
        with flowkern.use_backend(name):
            model.flow = nn.Glow(model.encoder.dim).to(model.device)
            report = model.fit(sentences)
        rows.append({"case": f"BertFlow.fit flow phase ({len(sentences)} sentences, 1 epoch)", "backend": name,
                     "ms": 1e3 * report.flow_seconds})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=4096 inference and the train step only")
    parser.add_argument("--fit", action="store_true", help="also time BertFlow.fit's flow phase on STS-B")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if "cpp" not in flowkern.backends():
        sys.exit("the compiled extension flowkern._C is not built: pip install --no-build-isolation -e .")
    flowkern.set_finite_checks(False)

    cases = list(_whole_flow_cases(args.quick)) + ([] if args.quick else list(_op_cases()))
    # About a second of calls per case and backend: at least --repeats, at most ten times that.
    timer = Timer("cpu", warmup_ms=0, rep_ms=1000, min_reps=args.repeats, max_reps=10 * args.repeats)
    rows = []
    for case, fn in cases:
        for name in BACKENDS:
            with flowkern.use_backend(name):
                rows.append({"case": case, "backend": name, "ms": timer.median_ms(fn)})
        print(f"  measured {case}", file=sys.stderr)
    if args.fit:
        data_dir = Path(os.environ.get("FLOWKERN_DATA", Path(__file__).resolve().parents[2] / "shared/data/sts"))
        rows += _fit_rows(data_dir)

    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"flowkern CPU: cpp vs torch backend ({machine}); {timer.describe()}")
    print(f"{'case':52s} {'torch':>10s} {'cpp':>10s} {'torch/cpp':>10s}")
    by_case: dict[str, dict[str, float]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["backend"]] = row["ms"]
    for case, times in by_case.items():
        print(f"{case:52s} {times['torch']:10.2f} {times['cpp']:10.2f} {times['torch'] / times['cpp']:10.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
