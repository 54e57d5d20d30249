"""README.md's python blocks run as written, in order, in one fresh CPU process, so the README stays true.

A block is skipped only when the line before its fence marks it: `<!-- not run: REASON -->` (it needs a GPU, the
network, ...; the reason is required) or `<!-- run when importable: MODULE -->` (run when MODULE imports here,
e.g. the Ray Data example). Also what the README says of `flowkern bench` on a CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEADLINE_S = 300
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
MARK = re.compile(r"<!--\s*([^:>]*?)\s*:\s*(.*?)\s*-->\s*\Z")
NOT_RUN, WHEN_IMPORTABLE = "not run", "run when importable"


def readme_blocks(text: str) -> list[tuple[str | None, str, str]]:
    """(mark kind or None, mark argument, code) of every ```python block, in order. The mark is an HTML comment
    on the line right before the fence; a comment there of another kind is an error, not a silent run."""
    blocks = []
    for fence in FENCE.finditer(text):
        before = text[:fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        kind, argument = None, ""
        if before.lstrip().startswith("<!--"):
            mark = MARK.search(before)
            if mark is None or mark.group(1) not in (NOT_RUN, WHEN_IMPORTABLE):
                raise ValueError(f"README.md: unknown mark before a python block: {before!r} (use "
                                 f"'<!-- {NOT_RUN}: REASON -->' or '<!-- {WHEN_IMPORTABLE}: MODULE -->')")
            kind, argument = mark.groups()
        blocks.append((kind, argument, fence.group(1)))
    return blocks


def script_of(blocks) -> tuple[str, list[str]]:
    """The blocks to run as one script (each introduced by a comment naming it), and why the others are not."""
    parts, skipped = [], []
    for number, (kind, argument, code) in enumerate(blocks, 1):
        if kind == NOT_RUN:
            skipped.append(f"block {number}: {argument}")
        elif kind == WHEN_IMPORTABLE and importlib.util.find_spec(argument) is None:
            skipped.append(f"block {number}: {argument} is not installed")
        else:
            parts.append(f"# README.md python block {number}\n{code}")
    return "\n".join(parts), skipped


def test_every_mark_states_a_reason():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 5, "README.md lost its python blocks"
    for kind, argument, code in blocks:
        if kind is not None:
            assert argument, f"a '{kind}' mark without its reason / module, before:\n{code}"
    assert any(kind == NOT_RUN and "GPU" in argument for kind, argument, _ in blocks), \
        "the GPU-only example is gone or no longer marked"


def test_a_mark_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="unknown mark"):
        readme_blocks("<!-- skip -->\n```python\nprint(1)\n```\n")
    blocks = readme_blocks("<!-- not run: needs a GPU -->\n```python\nimport torch\n```\n\n```python\nx = 1\n```\n")
    assert blocks == [(NOT_RUN, "needs a GPU", "import torch\n"), (None, "", "x = 1\n")]


def test_readme_python_blocks_run_in_order_on_cpu(tmp_path):
    data = os.environ.get("FLOWKERN_DATA", str(REPO.parent / "shared" / "data" / "sts"))
    if not Path(data).is_dir():
        pytest.skip(f"the STS data is not at {data} (set FLOWKERN_DATA)")
    script, skipped = script_of(readme_blocks(README.read_text(encoding="utf-8")))
    (tmp_path / "readme_blocks.py").write_text(script, encoding="utf-8")
    # As a reader runs them: no Triton interpreter, no GPU, the package from this checkout, a fresh directory.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLOWKERN_BACKEND")}
    env.update(FLOWKERN_DATA=str(Path(data).resolve()), CUDA_VISIBLE_DEVICES="",
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"), RAY_ADDRESS="", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, str(tmp_path / "readme_blocks.py")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, (f"a README block failed (skipped: {skipped}):\n{done.stderr[-6000:]}\n"
                                  f"stdout:\n{done.stdout[-2000:]}")
    assert (work / "model" / "flow.safetensors").is_file() and (work / "embeddings" / "manifest.json").is_file()


def test_bench_on_cpu_as_the_readme_says(tmp_path):
    """`flowkern bench` on a CPU: the whole Glow on torch and the C++ kernels (per op, fused, fused in TrainStep),
    the variants that cannot run here skipped with the reason (not errors), exit status 0. --smoke sizes, the
    code path of --quick."""
    import torch

    from flowkern import backend
    if not backend.usable_on("cpp", torch.device("cpu")):
        pytest.skip("the compiled extension flowkern._C is not built")
    report_path = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-m", "flowkern", "bench", "--smoke", "--suite", "glow", "--no-compile",
                           "--device", "cpu", "--json", str(report_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert [r for r in report["results"] if r["status"] != "ok"] == []
    timed = {(r["mode"], r["variant"]) for r in report["results"]}
    for mode in ("inference", "train_step"):
        assert {(mode, "torch"), (mode, "cpp-ops"), (mode, "cpp-fused")} <= timed, timed
    assert ("train_step", "cpp-fused+TrainStep") in timed
    for variant in ("triton-ops", "fused", "fused+TrainStep"):
        assert any(s.startswith(f"{variant}: ") and "CUDA" in s for s in report["skipped"]), report["skipped"]
