"""A killed export never costs the model at --output: at each named step of `export --force` a
subprocess dies (os._exit, like kill -9) or gets SIGTERM; --output must then be a complete model,
old or new, right away or after the next command, and the next export leaves no temp folders.

The steps are engine/atomic_folder.py's STEPS; its `fault_point` hook is replaced in the child.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnxruntime as ort
import pytest

from gpt2onnx.cli import main
from gpt2onnx.engine import atomic_folder
from gpt2onnx.engine.atomic_folder import MARKER, STEPS
from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.export.model_source import resolve_model

# The child: replaces the hook, then runs the CLI. At its step it dies at once ("kill"), or says
# "ready" and waits for the test's signal ("wait"); exit 98 means no signal came.
CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from gpt2onnx.engine import atomic_folder
    from gpt2onnx.cli import main

    step, mode, ready = sys.argv[1:4]

    def hook(name):
        if name != step:
            return
        if mode == "kill":
            os._exit(99)
        Path(ready).write_text("ready")
        time.sleep(120)
        os._exit(98)

    atomic_folder.fault_point = hook
    sys.exit(main(sys.argv[4:]))
""")
FIRST_NEW = STEPS.index("new-renamed-in")  # from this step on, --output holds the new model


def start_child(step: str, mode: str, out: Path, hf_folder: Path) -> subprocess.Popen:
    """`export --force` of the fused graph over `out` (the unfused one), stopping at `step`."""
    argv = ["--quiet", "export", "--model", hf_folder, "--output", out, "--force"]
    cmd = [sys.executable, "-c", CHILD, step, mode, out.parent / "ready", *argv]
    return subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def temp_folders(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def assert_model(folder: Path, version: str) -> None:
    """A complete model folder: the manifest reads, its files exist, model.onnx loads. The old
    model is the unfused graph, the new one the fused."""
    manifest = read_manifest(folder)
    ort.InferenceSession(str(folder / manifest.model_file), providers=["CPUExecutionProvider"])
    held = "new" if manifest.optimized else "old"
    assert held == version, f"{folder} holds the {held} model, expected the {version} one"


@pytest.fixture
def old_model(tmp_path, tiny_fp32_plain) -> Path:
    out = tmp_path / "parent" / "model"
    shutil.copytree(tiny_fp32_plain, out)
    return out


def test_every_step_is_reached(old_model, hf_folder, monkeypatch, capsys):
    """Guards the tests below: a step the export never reaches would pass them without testing."""
    seen = []
    monkeypatch.setattr(atomic_folder, "fault_point", seen.append)
    assert main(["--quiet", "export", "--model", str(hf_folder), "--output", str(old_model), "--force"]) == 0
    assert seen == list(STEPS)


# The children the tests below judge, run side by side (each over its own copy of the old model):
# an export killed at each step, two more killed at the one window with nothing at --output, and
# exports held at a step until a signal ends them.
KILLS = {**{step: step for step in STEPS}, "load": "old-moved-aside", "no-force": "old-moved-aside"}
SIGNALS = {"weights-written-15": ("weights-written", signal.SIGTERM),
           "old-moved-aside-15": ("old-moved-aside", signal.SIGTERM),
           "weights-written-1": ("weights-written", signal.SIGHUP)}  # fmt: skip


def copy_of(model: Path, tmp_path_factory, name: str) -> Path:
    out = tmp_path_factory.mktemp(name) / "parent" / "model"
    shutil.copytree(model, out)
    return out


@pytest.fixture(scope="module")
def killed(tiny_fp32_plain, hf_folder, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """KILLS' children: name -> (the model folder, the child's exit status, its stderr)."""
    children = {}
    for name, step in KILLS.items():
        out = copy_of(tiny_fp32_plain, tmp_path_factory, f"killed-{name}")
        children[name] = (out, start_child(step, "kill", out, hf_folder))
    return {name: (out, *finish(proc)) for name, (out, proc) in children.items()}


@pytest.fixture(scope="module")
def signalled(tiny_fp32_plain, hf_folder, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """SIGNALS' children, each signalled once it waits at its step: name -> (the model folder,
    the exit status, stderr)."""
    children = {}
    for name, (step, _) in SIGNALS.items():
        out = copy_of(tiny_fp32_plain, tmp_path_factory, f"signalled-{name}")
        children[name] = (out, start_child(step, "wait", out, hf_folder))
    deadline, waiting = time.monotonic() + 180, dict(children)
    try:
        while waiting:
            for name, (out, proc) in list(waiting.items()):
                if (out.parent / "ready").exists():
                    proc.send_signal(SIGNALS[name][1])
                    del waiting[name]
                else:
                    assert proc.poll() is None, f"the child {name} exited before its step"
            assert time.monotonic() < deadline, f"children never reached their steps: {sorted(waiting)}"
            time.sleep(0.05)
    finally:
        results = {name: (out, *finish(proc)) for name, (out, proc) in children.items()}
    return results


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step(step, killed, hf_folder, capsys):
    old_model, code, err = killed[step]
    parent = old_model.parent
    assert code == 99, f"the child did not die at {step}: {err}"
    version = "new" if STEPS.index(step) >= FIRST_NEW else "old"
    if step == "old-moved-aside":  # the one window with nothing at --output
        assert not old_model.exists() and any(".model.old-" in name for name in temp_folders(parent))
    else:
        assert_model(old_model, version)
    assert resolve_model(str(old_model)) == old_model  # what `generate --model PATH` does first
    assert_model(old_model, version)
    assert main(["--quiet", "export", "--model", str(hf_folder), "--output", str(old_model), "--force"]) == 0
    assert_model(old_model, "new")
    assert temp_folders(parent) == []


def test_engine_load_restores_the_model_a_kill_left_aside(killed):
    old_model, code, err = killed["load"]
    assert code == 99, err
    assert not old_model.exists()
    from gpt2onnx.engine.engine import Engine

    assert Engine.load(old_model, provider="cpu").generate("Hi", max_new_tokens=2).completions[0].token_ids
    assert_model(old_model, "old")  # the killed export's .partial waits for the next export's sweep
    assert not [name for name in temp_folders(old_model.parent) if ".old-" in name]


def test_export_without_force_restores_the_model_a_kill_left_aside(killed, hf_folder, capsys):
    old_model, code, err = killed["no-force"]
    parent = old_model.parent
    assert code == 99, err
    assert not old_model.exists()
    capsys.readouterr()
    assert main(["--quiet", "export", "--model", str(hf_folder), "--output", str(old_model)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert_model(old_model, "old")
    assert temp_folders(parent) == []


@pytest.mark.parametrize("name", SIGNALS)
def test_sigterm_cleans_up_like_ctrl_c(name, signalled):
    old_model, code, err = signalled[name]
    sig = SIGNALS[name][1]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 128 + sig and len(lines) == 1 and f"terminated ({sig.name})" in lines[0], err
    assert_model(old_model, "old")  # restored by the exporter itself, before the next command
    assert temp_folders(old_model.parent) == []


# The sweep itself: only our own folders, only of dead processes.


@pytest.fixture(scope="module")
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def make_temp(parent: Path, name: str, *files: str) -> Path:
    folder = parent / name
    folder.mkdir(parents=True)
    for file in files:
        (folder / file).write_text("x")
    return folder


def test_sweep_removes_dead_partials_and_restores_dead_old_folders(tmp_path, tiny_fp32, dead_pid):
    shutil.copytree(tiny_fp32, tmp_path / f".a.old-{dead_pid}")  # a's only copy
    shutil.copytree(tiny_fp32, tmp_path / "b")
    shutil.copytree(tiny_fp32, tmp_path / f".b.old-{dead_pid}")  # superseded by b
    make_temp(tmp_path, f".b.partial-{dead_pid}", MARKER, "model.onnx")
    make_temp(tmp_path, f".c.partial-{dead_pid}")  # killed right after mkdir
    atomic_folder.sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    read_manifest(tmp_path / "a")


def test_sweep_leaves_live_processes_and_folders_that_are_not_ours(tmp_path, tiny_fp32, dead_pid):
    live = [
        make_temp(tmp_path, f".a.partial-{os.getpid()}", MARKER),  # a running export's
        make_temp(tmp_path, f".b.old-{os.getpid()}", "manifest.json"),
    ]
    foreign = [
        make_temp(tmp_path, f".c.partial-{dead_pid}", "thesis.tex"),  # no marker, no manifest
        make_temp(tmp_path, f".d.old-{dead_pid}", "thesis.tex"),
        make_temp(tmp_path, f"e.partial-{dead_pid}", MARKER),  # not the exact pattern
        make_temp(tmp_path, f".f.partial-{dead_pid}x", MARKER),
    ]
    (tmp_path / f".g.partial-{dead_pid}").symlink_to(live[0])
    atomic_folder.sweep(tmp_path)
    for folder in [*live, *foreign]:
        assert folder.is_dir() and any(folder.iterdir()), folder
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()  # nothing renamed back


def test_output_that_is_a_symlink_is_refused(tmp_path, tiny_fp32, hf_folder, capsys):
    (tmp_path / "link").symlink_to(tiny_fp32)
    capsys.readouterr()
    argv = ["--quiet", "export", "--model", str(hf_folder), "--output", str(tmp_path / "link"), "--force"]
    assert main(argv) == 2
    assert "symbolic link" in capsys.readouterr().err
    read_manifest(tiny_fp32)
