"""Ctrl-C never crashes: every command, interrupted at any moment (its imports, an export, a long
decode, a stream, a score, a benchmark), exits 130 with one line on stderr, `gpt2-onnx: interrupted`,
and no traceback or abort ("terminate called without an active exception", when the engine's
decode thread is inside onnxruntime as the interpreter exits). Each command runs in its own
process group and gets SIGINT as a terminal's Ctrl-C sends it: to the whole group.

The moments are observed, not timed: a library's shared object in /proc/PID/maps (imports), the
export's temp folder and its files, the first streamed text, a progress line (--verbose).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from gpt2onnx.engine.model_folder import read_manifest

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches the command in /proc")

INTERRUPTED = "gpt2-onnx: interrupted\n"
SCRIPT = Path(sys.executable).with_name("gpt2-onnx")  # the console script beside this Python
LOADED = "running on CPU"  # --verbose: the session is made; the command's work starts right after
NO_EOS = ["--logit-bias", "50256=-100"]  # the tiny model would otherwise end its rows at once
# The command with the export held at one of its steps (engine/atomic_folder.py's fault_point)
# until a signal comes: a tiny export finishes in about a second, so a Ctrl-C sent on seeing its
# files could land after the new folder is in place, and the test would not know what to expect.
HELD = """
import sys, time
from pathlib import Path
from gpt2onnx.engine import atomic_folder
from gpt2onnx.cli import main
step, ready = sys.argv[1:3]
def hold(name):
    if name == step:
        Path(ready).write_text("held")
        time.sleep(60)
atomic_folder.fault_point = hold
sys.exit(main(sys.argv[3:]))
"""


class Command:
    """`gpt2-onnx ARGV` in its own process group, its output read as it comes."""

    def __init__(self, *argv, cwd: Path, script: bool = False, held: tuple[str, Path] | None = None):
        """held: (an export step, a file): the export stops at that step and writes the file."""
        start = [str(SCRIPT)] if script else [sys.executable, "-m", "gpt2onnx"]
        if held is not None:
            start = [sys.executable, "-c", HELD, *held]
        self.proc = subprocess.Popen(
            [*start, *map(str, argv)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            start_new_session=True,
        )
        self.out, self.err = bytearray(), bytearray()

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"exit {self.proc.returncode} before {what}: {self.err.decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} within {timeout} s: {self.err.decode()[-2000:]}")
            self.read(0.02)

    def read(self, wait: float) -> None:
        pipes = {
            p.fileno(): buf
            for p, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
            if not p.closed
        }
        for fd in select.select(list(pipes), [], [], wait)[0]:
            pipes[fd].extend(os.read(fd, 1 << 16))

    def loaded(self, name: str) -> bool:
        """Whether the process has mapped a shared object whose path has `name` in it."""
        try:
            return name in Path(f"/proc/{self.proc.pid}/maps").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False

    def ctrl_c(self, times: int = 1, gap: float = 0.0) -> None:
        for i in range(times):
            time.sleep(gap * (i > 0))
            os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once the process and every process of its group are gone."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"still running {timeout} s after Ctrl-C: {self.err.decode()[-2000:]}"
            ) from None
        deadline = time.monotonic() + 10
        while group_alive(self.proc.pid):
            assert time.monotonic() < deadline, (
                f"processes of the command's group outlived it: {group_alive(self.proc.pid)}"
            )
            time.sleep(0.05)
        return self.proc.returncode, (self.out + out).decode(), (self.err + err).decode()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.communicate()


def group_alive(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def assert_interrupted(code: int, err: str, after: str | None = None) -> None:
    """Exit 130 and `gpt2-onnx: interrupted` as the only line on stderr (or the only one after the
    line holding `after`, for commands that log progress)."""
    if after is not None:
        head, found, tail = err.partition(after)
        assert found, f"no {after!r} on stderr:\n{err}"
        err = tail.partition("\n")[2]
    assert code == 130 and err == INTERRUPTED, f"exit {code}, stderr:\n{err}"


def prompts(n: int) -> list[str]:
    return [arg for i in range(n) for arg in ("--prompt", f"Prompt number {i}:")]


@pytest.fixture
def long_stream(tiny_fp32) -> list:
    """A stream of minutes: 100 prompts in turn, 120 tokens each, EOS banned."""
    return ["generate", "--model", tiny_fp32, *prompts(100), "--max-new-tokens", "120", *NO_EOS,
            "--max-batch", "1", "--provider", "cpu", "--stream"]  # fmt: skip


@pytest.mark.parametrize(
    "argv, library",
    [
        (["generate", "--model", "{model}", "--prompt", "Hi", "--provider", "cpu"], "numpy"),
        (["generate", "--model", "{model}", "--prompt", "Hi", "--provider", "cpu"], "onnxruntime"),
        (["score", "--model", "{model}", "--file", "{model}/tokenizer.json", "--provider", "cpu"], "numpy"),
        (["bench", "--model", "{model}", "--provider", "cpu", "--baselines", "ort-plain-loop"], "numpy"),
        (["serve", "--model", "{model}", "--port", "0", "--provider", "cpu"], "numpy"),
        (["--quiet", "export", "--model", "{hf}", "--output", "out"], "numpy"),
    ],
    ids=["generate", "generate-ort", "score", "bench", "serve", "export"],
)
def test_ctrl_c_during_imports(argv, library, tiny_fp32, hf_folder, tmp_path):
    cmd = Command(*[a.format(model=tiny_fp32, hf=hf_folder) for a in argv], cwd=tmp_path)
    cmd.wait_for(lambda: cmd.loaded(library), f"{library} loaded")
    cmd.ctrl_c()
    code, _, err = cmd.finish()
    assert_interrupted(code, err)
    assert list(tmp_path.iterdir()) == [], "an interrupted command left files behind"


@pytest.mark.parametrize("step", ["tmp-created", "checked"])
def test_ctrl_c_during_export_leaves_no_folder(step, hf_folder, tmp_path):
    out, ready = tmp_path / "models" / "tiny", tmp_path / "held"
    cmd = Command(
        "--quiet", "export", "--model", hf_folder, "--output", out, cwd=tmp_path, held=(step, ready)
    )
    cmd.wait_for(ready.exists, f"the export at {step}")
    cmd.ctrl_c()
    code, _, err = cmd.finish()
    assert_interrupted(code, err)
    assert list(out.parent.iterdir()) == [], "an interrupted export left a folder behind"


def test_ctrl_c_during_export_force_keeps_the_old_model(tiny_fp32, hf_folder, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_fp32, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ready = tmp_path.parent / f"{tmp_path.name}-held"  # outside tmp_path, whose listing is checked
    cmd = Command("--quiet", "export", "--model", hf_folder, "--output", out, "--force", cwd=tmp_path,
                  held=("weights-written", ready))  # fmt: skip
    cmd.wait_for(ready.exists, "weights written")
    cmd.ctrl_c()
    code, _, err = cmd.finish()
    assert_interrupted(code, err)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"] and read_manifest(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("times", [1, 3], ids=["once", "thrice"])
def test_ctrl_c_in_the_middle_of_a_stream(times, long_stream, tmp_path):
    cmd = Command(*long_stream, cwd=tmp_path, script=SCRIPT.exists())
    cmd.wait_for(lambda: len(cmd.out) > 500, "streamed text")
    cmd.ctrl_c(times, gap=0.005)
    code, out, err = cmd.finish()
    assert_interrupted(code, err)
    assert out.startswith("Prompt number 0:")


def test_ctrl_c_with_the_reader_of_the_stream_gone(long_stream, tmp_path):
    """Ctrl-C in `gpt2-onnx generate --stream | head`: the reader dies too; still one line."""
    cmd = Command(*long_stream, cwd=tmp_path)
    cmd.wait_for(lambda: len(cmd.out) > 500, "streamed text")
    cmd.ctrl_c()
    cmd.proc.stdout.close()  # at once: the command's last flush, if not its print, finds the pipe closed
    code, _, err = cmd.finish()
    assert_interrupted(code, err)


def test_a_closed_stdout_ends_the_stream_quietly(long_stream, tmp_path):
    """`gpt2-onnx generate --stream | head -c 500`: exit 141, as SIGPIPE would end it, nothing on stderr."""
    cmd = Command(*long_stream, cwd=tmp_path)
    cmd.wait_for(lambda: len(cmd.out) > 500, "streamed text")
    cmd.proc.stdout.close()
    code, _, err = cmd.finish()
    assert code == 141 and err == "", f"exit {code}, stderr:\n{err}"


@pytest.mark.parametrize("mode", [["--json"], ["--stop", "never said"]], ids=["json", "plain-stop"])
def test_ctrl_c_in_the_middle_of_a_decode(mode, tiny_fp32, tmp_path):
    """A generate of 100 prompts x 120 tokens, 2 rows at a time: seconds of decode steps in the
    engine's thread even on a fast CPU (6,000 steps; 8 rows at a time ended within the 0.5 s on
    an AVX-512 EPYC), nothing printed before the end."""
    cmd = Command("--verbose", "generate", "--model", tiny_fp32, *prompts(100), "--max-new-tokens", 120,
                  *NO_EOS, "--max-batch", 2, "--provider", "cpu", *mode, cwd=tmp_path)  # fmt: skip
    cmd.wait_for(lambda: LOADED.encode() in cmd.err, "the model loaded")
    time.sleep(0.5)
    cmd.ctrl_c()
    code, out, err = cmd.finish()
    assert_interrupted(code, err, after=LOADED)
    assert out == "", "an interrupted generate printed part of its answer"


def test_ctrl_c_in_the_middle_of_a_score(tiny_fp32, tmp_path):
    text = tmp_path / "long.txt"
    text.write_text(" ".join(f"word{i % 997} and more" for i in range(60_000)))
    cmd = Command(
        "--verbose", "score", "--model", tiny_fp32, "--file", text, "--provider", "cpu", cwd=tmp_path
    )
    cmd.wait_for(lambda: LOADED.encode() in cmd.err, "the model loaded")
    time.sleep(0.5)
    cmd.ctrl_c()
    code, out, err = cmd.finish()
    assert_interrupted(code, err, after=LOADED)
    assert out == ""


def test_ctrl_c_in_the_middle_of_a_bench(tiny_fp32, tmp_path):
    """Its worker process gets the Ctrl-C too (the same process group); neither says more than the line."""
    cmd = Command("bench", "--model", tiny_fp32, "--provider", "cpu", "--baselines", "ort-plain-loop",
                  "--batches", 1, "--prompt-lens", 5, "--new-tokens", 100, "--repeats", 1000,
                  "--out", tmp_path / "results", cwd=tmp_path)  # fmt: skip
    cmd.wait_for(lambda: LOADED.encode() in cmd.err, "the worker's model loaded")
    time.sleep(0.5)
    cmd.ctrl_c()
    code, _, err = cmd.finish()
    assert_interrupted(code, err, after=LOADED)


def test_serve_stops_on_ctrl_c_with_exit_0(tiny_shared, tmp_path):
    """Once it serves, serve's own handler drains and stops it on Ctrl-C: exit 0 (as on SIGTERM),
    no traceback, no `interrupted`. Before that, a Ctrl-C is an interrupt (test_ctrl_c_during_imports)."""
    cmd = Command("--quiet", "serve", "--model", tiny_shared, "--port", 0, "--provider", "cpu", cwd=tmp_path)
    cmd.wait_for(lambda: re.search(rb"http://[^ ]+/v1", cmd.err), "the server's address")
    health = re.search(rb"http://[^ ]+/v1", cmd.err)[0].decode().removesuffix("/v1") + "/health"
    cmd.wait_for(lambda: answers(health), "an answer from /health")
    cmd.ctrl_c()
    code, _, err = cmd.finish()
    assert code == 0 and "Traceback" not in err and "terminate called" not in err, f"exit {code}:\n{err}"
    assert "interrupted" not in err


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
