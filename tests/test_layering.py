"""The layers of the house (DESIGN.md): each imports only from the ones below it, no import circle between
packages, and the kernels import and run without the application's dependencies."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom. A module belongs to the layer of the longest prefix naming it. The root package `flowkern` (itself
# only, not as a prefix) is the front door that may re-export any layer, so nothing below the application imports it.
LAYERS = {
    "application": ("flowkern", "flowkern.__main__", "flowkern.cli", "flowkern.demo", "flowkern.bench",
                    "flowkern.embed", "flowkern.integrations"),
    "models": ("flowkern.models", "flowkern.data"),
    "nn": ("flowkern.nn",),
    "ops": ("flowkern.ops", "flowkern.backend"),
    "backends": ("flowkern.kernels", "flowkern._C"),
    "base": ("flowkern._checks", "flowkern._extras"),
}
# The compiled extension has no Python source to find.
EXTENSION_MODULES = {"flowkern._C"}
# What the application installs as extras; the kernels must import and run without any of them.
APPLICATION_DEPENDENCIES = ("transformers", "scipy", "pyarrow", "ray", "sentence_transformers", "matplotlib",
                            "tqdm", "safetensors")


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the package."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _dynamic_import_target(call: ast.Call) -> str | None:
    """The module named by importlib.import_module("flowkern....") or an f-string's constant head."""
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
    if name != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return arg.values[0].value.rstrip(".") or None
    return None


def module_imports(package_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """Module -> (line, imported module) for every import of the package by the package, at any depth
    (function-level and dynamic imports included); `from pkg import name` counts as pkg.name when that is a
    module."""
    files = module_files(package_dir)
    known = set(files) | EXTENSION_MODULES
    package = package_dir.name
    imports: dict[str, list[tuple[int, str]]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parent = module.split(".")[:len(module.split(".")) + is_package - node.level]
                    base = ".".join(parent + ([node.module] if node.module else []))
                else:
                    base = node.module
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    found.append((node.lineno, submodule if submodule in known else base))
            elif isinstance(node, ast.Call) and (target := _dynamic_import_target(node)):
                found.append((node.lineno, target))
        imports[module] = [(line, target) for line, target in dict.fromkeys(found)
                           if target == package or target.startswith(package + ".")]
    return imports


def layer_of(module: str) -> str | None:
    matches = [(len(prefix), layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
               if module == prefix or (prefix != "flowkern" and module.startswith(prefix + "."))]
    return max(matches)[1] if matches else None


def unlayered_modules(imports: dict[str, list[tuple[int, str]]]) -> list[str]:
    return sorted(module for module in imports if layer_of(module) is None)


def upward_imports(imports: dict[str, list[tuple[int, str]]]) -> list[str]:
    """One line per import of a higher layer: "<module>:<line> (<layer>) imports <target> (<layer>)"."""
    rank = {layer: index for index, layer in enumerate(LAYERS)}   # 0 = top
    found = []
    for module, targets in imports.items():
        for line, target in targets:
            here, there = layer_of(module), layer_of(target)
            if here is not None and there is not None and rank[there] < rank[here]:
                found.append(f"{module}:{line} ({here}) imports {target} ({there})")
    return found


def package_of(module: str) -> str:
    """The unit circles are checked between: flowkern.<name> (a subpackage or a top-level module), or flowkern."""
    return ".".join(module.split(".")[:2])


def package_cycles(imports: dict[str, list[tuple[int, str]]]) -> list[str]:
    """One line per circle of imports between packages, naming an import site of each of its edges."""
    sites: dict[tuple[str, str], str] = {}
    for module, targets in imports.items():
        for line, target in targets:
            edge = (package_of(module), package_of(target))
            if edge[0] != edge[1]:
                sites.setdefault(edge, f"{module}:{line} imports {target}")
    graph: dict[str, set[str]] = {}
    for source, target in sites:
        graph.setdefault(source, set()).add(target)
    cycles, seen = [], set()

    def visit(node: str, path: list[str]) -> None:
        for following in sorted(graph.get(node, ())):
            if following in path:
                cycle = path[path.index(following):] + [following]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    cycles.append(" -> ".join(cycle) + ": " + "; ".join(
                        sites[(a, b)] for a, b in zip(cycle, cycle[1:])))
            else:
                visit(following, path + [following])

    for start in sorted(graph):
        visit(start, [start])
    return cycles


@pytest.fixture(scope="module")
def flowkern_imports():
    return module_imports(ROOT / "flowkern")


def test_every_module_has_a_layer(flowkern_imports):
    assert not unlayered_modules(flowkern_imports), "add these modules to a layer in LAYERS"


def test_no_import_runs_up_a_layer(flowkern_imports):
    assert not upward_imports(flowkern_imports)


def test_no_import_circle_between_packages(flowkern_imports):
    assert not package_cycles(flowkern_imports)


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = tmp_path / "flowkern" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return tmp_path / "flowkern"


def test_checker_finds_upward_and_function_level_imports(tmp_path):
    package = _fake_package(tmp_path, {
        "__init__.py": "",
        "embed/__init__.py": "",
        "embed/feeder.py": "",
        "nn/__init__.py": "from .. import backend\n",
        "backend.py": "import importlib\nimportlib.import_module(f'flowkern.kernels.{0}')\n",
        "kernels/__init__.py": "",
        "models/__init__.py": "",
        "models/encoder.py": "def encode():\n    from flowkern.embed.feeder import token_batches\n",
        "ops/__init__.py": "import flowkern\n",
    })
    imports = module_imports(package)
    assert imports["flowkern.backend"] == [(2, "flowkern.kernels")]
    assert imports["flowkern.nn"] == [(1, "flowkern.backend")]
    assert upward_imports(imports) == [
        "flowkern.models.encoder:2 (models) imports flowkern.embed.feeder (application)",
        "flowkern.ops:1 (ops) imports flowkern (application)",
    ]


def test_checker_finds_circles_between_packages_and_unlayered_modules(tmp_path):
    package = _fake_package(tmp_path, {
        "__init__.py": "",
        "nn/__init__.py": "from flowkern.nn.glow import Glow\n",
        "nn/glow.py": "from ..ops import glow\n",
        "ops/__init__.py": "from ..nn import Glow\n",
        "stray.py": "",
    })
    imports = module_imports(package)
    assert package_cycles(imports) == [
        "flowkern.nn -> flowkern.ops -> flowkern.nn: flowkern.nn.glow:1 imports flowkern.ops; "
        "flowkern.ops:1 imports flowkern.nn"]
    assert unlayered_modules(imports) == ["flowkern.stray"]


# Imports the kernels with the application's dependencies unimportable, trains a small Glow one fused step on
# CPU (the Triton interpreter), and reports what flowkern itself tried to import of them.
_KERNELS_ONLY = """
import importlib.machinery, json, os, sys

BLOCKED = set(json.loads(os.environ["BLOCKED"]))
PACKAGE_DIR = os.environ["PACKAGE_DIR"]
attempts = []

# Finds the blocked modules (so torch's own find_spec probes still work) with a loader that fails as the import
# of a module that is not installed fails; records the imports that flowkern's own code attempts.
class ApplicationBlocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
            attempts.append(f"{frame.f_code.co_filename}:{frame.f_lineno} imports {name}")
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked)", name=spec.name)

    def exec_module(self, module):
        raise AssertionError("unreachable: create_module raises")

sys.meta_path.insert(0, ApplicationBlocker())
import torch
import flowkern, flowkern.nn, flowkern.ops
from flowkern.nn import Glow

torch.manual_seed(0)
flow = Glow(8, levels=2, depth=1, hidden=8)
x = torch.randn(16, 8)
with flowkern.use_backend("triton"):
    flow(x)   # data-dependent ActNorm init, on the per-op path
    path = flow.path_for(x)
    loss = -flow.log_prob(x).mean()
    loss.backward()
grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in flow.parameters() if p.grad is not None)
EXTRA_CODE
print(json.dumps({"path": path, "grads_finite": grads_finite, "attempts": attempts,
                  "imported": sorted(BLOCKED & {name.split(".")[0] for name in sys.modules})}))
"""


def _run_kernels_only(extra_code: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", BLOCKED=json.dumps(APPLICATION_DEPENDENCIES),
               PACKAGE_DIR=str(ROOT / "flowkern"))
    return subprocess.run([sys.executable, "-c", _KERNELS_ONLY.replace("EXTRA_CODE", extra_code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_plain_install_needs_torch_and_triton_only():
    setup_call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                      if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    requires = next(ast.literal_eval(k.value) for k in setup_call.keywords if k.arg == "install_requires")
    assert {re.split(r"[<>=!~; \[]", requirement)[0] for requirement in requires} == {"torch", "triton"}


def test_kernels_import_and_run_without_the_application_dependencies():
    run = _run_kernels_only()
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report == {"path": "fused", "grads_finite": True, "attempts": [], "imported": []}


def test_the_blocker_makes_the_application_unimportable():
    run = _run_kernels_only("import flowkern.models")
    assert run.returncode != 0
    assert "(blocked)" in run.stderr and "flowkern/models/" in run.stderr


def test_a_missing_extra_is_named_in_the_error(monkeypatch):
    installed, uninstalled = importlib.util.find_spec, ("scipy", "tqdm")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in uninstalled else installed(name))
    monkeypatch.delitem(sys.modules, "flowkern.models", raising=False)
    with pytest.raises(ImportError, match=r"^flowkern.models needs the 'bertflow' extra \(missing scipy, tqdm\): "
                                          r"pip install 'flowkern\[bertflow\]'$"):
        importlib.import_module("flowkern.models")
