"""How the code is put together: packages in layers, no import cycle between modules (imports
inside functions included), no class deriving from another of ours but exceptions, and the
public import path."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"engine": "gpt2onnx.engine", "export": "gpt2onnx.export", "serve": "gpt2onnx.serve",
            "benchmarks": "gpt2onnx.benchmarks", "gpt2onnx": "gpt2onnx"}  # fmt: skip
# Each package imports only those before it.
LAYERS = ["gpt2onnx.engine", "gpt2onnx.export", "gpt2onnx.serve", "gpt2onnx.benchmarks", "gpt2onnx"]
SCRIPTS = {
    "gpt2onnx.benchmarks.worker",
    "gpt2onnx.benchmarks.hf_runners",
    "gpt2onnx.benchmarks.llamacpp_runner",
    "gpt2onnx.benchmarks.ctranslate2_runner",
}  # import siblings by bare name (run in other venvs)


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours that `name` imports, anywhere in its file."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            elif name in SCRIPTS and f"{package}.{base}" in known:
                base = f"{package}.{base}"
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_cycle_between_modules():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def layer(module: str) -> int:
    return max(i for i, package in enumerate(LAYERS) if module == package or module.startswith(package + "."))


def test_packages_import_only_the_layers_below():
    wrong = [f"{a} imports {b}" for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert not wrong, wrong


def test_the_import_graph_is_read_whole():
    """The checks above can fail: they see relative, absolute and function-local imports."""
    edges = graph()
    assert "gpt2onnx.engine.kv_cache" in edges["gpt2onnx.engine.session"]  # relative
    assert "gpt2onnx.engine.session" in edges["gpt2onnx.export.exporter"]  # absolute
    assert "gpt2onnx.export.exporter" in edges["gpt2onnx.export.model_source"]  # inside a function
    assert "gpt2onnx.benchmarks.measure" in edges["gpt2onnx.benchmarks.worker"]  # a script's sibling


def test_no_class_derives_from_another_of_ours_but_exceptions():
    derived = []
    for name in modules():
        if name in SCRIPTS or name == "gpt2onnx.__main__":
            continue
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name:
                continue
            for base in cls.__mro__[1:]:
                if base.__module__.startswith("gpt2onnx") and not issubclass(base, BaseException):
                    derived.append(f"{name}.{cls_name} derives from {base.__module__}.{base.__name__}")
    assert not derived, derived


@pytest.mark.parametrize("code", [
    "from gpt2onnx import Engine, SamplingConfig, InputError, ModelFolderError, ProviderError",
    "import gpt2onnx, sys; assert 'torch' not in sys.modules, 'the engine imports torch'",
])  # fmt: skip
def test_the_public_import_path(code):
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
