"""What `flowkern bench` times: a Case per (thing, shape, dtype, mode), built per variant (backend, compiled, fused),
and the suites that order them (most wanted first: the time budget cuts from the end)."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch

import flowkern
from flowkern import TrainStep, backend, nn, ops

from .timer import Timer

COMPILED = "torch.compile"

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

def _coupling_epilogue_args(affine: bool):
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
        ("coupling_epilogue_additive", lambda x2, h: ops.coupling_epilogue(x2, h, False),
         _coupling_epilogue_args(False), 3, 3),
        ("coupling_epilogue_affine", lambda x2, h: ops.coupling_epilogue(x2, h, True),
         _coupling_epilogue_args(True), 4, 11),
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
    timer = Timer(device)

    def setup(variant):
        sentences = _distinct_sts_sentences(data_dir)[:limit]
        warmup = sentences[:2000]
        if variant.startswith("flowkern"):
            from flowkern.embed import Embedder
            from flowkern.models import BertFlow
            embedder = Embedder(BertFlow(encoder, device=device, seed=0), pooled=variant.endswith("pooled"))

            def run():
                embedder(warmup)
                timer.synchronize()
                start = time.perf_counter()
                batches = embedder.tokenize(sentences)
                tokenize_s = time.perf_counter() - start
                embedder.embed_batches(batches, len(sentences))
                timer.synchronize()
                total = time.perf_counter() - start
                row = dict(sentences=len(sentences), sentences_per_s=len(sentences) / total,
                           tokenizer_share=tokenize_s / total)
                if timer.on_gpu:
                    busy = timer.counts(lambda: embedder(sentences[:5000]))["gpu_busy_ms"]
                    row["gpu_busy_share"] = busy / 1e3 / timer.wall_s(lambda: embedder(sentences[:5000]))
                return row
            return run
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(encoder, device=str(device))
        # Widened or narrowed explicitly: a packed encoder (bench/pack_encoder.py) stores fp16 weights.
        st = st.half() if variant.endswith("fp16") else st.float()

        def run():
            st.encode(warmup)
            seconds = timer.wall_s(lambda: st.encode(sentences))
            return dict(sentences=len(sentences), sentences_per_s=len(sentences) / seconds)
        return run
    return [Case("embed", "embed distinct STS sentences", (0,), torch.float32, "throughput", setup,
                 variants=["flowkern", "flowkern pooled", "sentence-transformers fp32", "sentence-transformers fp16"])]

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

def variants_for(device: torch.device, with_compile: bool) -> list[str]:
    names = [name for name in flowkern.backends() if backend.usable_on(name, device)]
    if with_compile:
        names.insert(names.index("torch") + 1, COMPILED)
    return names

SUITES = ("glow", "models", "ops", "cuda")
DEFAULT_SUITES = ("glow", "models", "ops")
SMOKE_GLOW_CONFIGS = [(12, 2, 2, 8, "additive", "reverse"), (12, 2, 2, 8, "affine", "lu")]
COMPILED_VARIANTS = (COMPILED, COMPILED_RO)

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

def label(case: Case) -> str:
    """The case as a report line names it: name, shape, dtype, mode."""
    return f"{case.name} {'x'.join(map(str, case.shape))} {str(case.dtype).split('.')[-1]} {case.mode}"
