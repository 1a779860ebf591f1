"""The engines a user would pick instead of ours on the CPU, run by `gpt2-onnx bench` beside ours:
llama.cpp (llama-cpp-python: f32, f16, q8_0, q4_0 GGUF) and CTranslate2 (float32, int8).

Each lives in its own venv, made by its own setup script and found here by itself; a peer whose
venv is missing is skipped with the command that makes it. All convert the same reference
checkpoint (reference.hf_checkpoint) with their own converter, and are checked before they are
timed (checks.py): our prompt ids are their tokens, and at full precision their greedy tokens
are transformers'."""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.engine.tokenizer import Tokenizer

from . import llamacpp
from .reference import greedy_tokens, hf_checkpoint

log = logging.getLogger(__name__)

# Mixed text for the tokenizer check: spaces, digits, punctuation, a newline, non-ASCII.
CHECK_TEXT = "Hello, world! GPT-2's tokenizer: 1234 tokens\n\tcafé — naïve 東京 🙂  end."
CHECK_PROMPT_LEN, CHECK_NEW_TOKENS = 32, 16


@dataclass(frozen=True)
class Peer:
    engine: str  # "llama.cpp" or "ctranslate2"
    precision: str  # in the engine's own terms
    ours: str  # our dtype at the same precision, to compare with


@dataclass(frozen=True)
class Venv:
    path: str  # relative to the repository root
    module: str  # what must import there
    setup: str  # the command that makes it


PEERS = {
    **{f"llama.cpp-{p}": Peer("llama.cpp", p, d) for p, d in
       (("f32", "fp32"), ("f16", "fp16"), ("q8_0", "int8"), ("q4_0", "int4"))},
    **{f"ctranslate2-{p}": Peer("ctranslate2", p, d) for p, d in (("float32", "fp32"), ("int8", "int8"))},
}  # fmt: skip
VENVS = {
    "llama.cpp": Venv(str(llamacpp.VENV), "llama_cpp", ".ci/setup-llamacpp (about 10 minutes)"),
    "ctranslate2": Venv(".venv-ctranslate2", "ctranslate2", ".ci/setup-ctranslate2 (about 2 minutes)"),
}
MAX_BATCH = {"llama.cpp": 1}  # llama-cpp-python's Llama has no batch API


def venv_dir(engine: str) -> Path:
    """The peer's venv: under the working directory, else beside this source tree (an editable
    install run from elsewhere). Absolute, not resolved: a venv python is a symlink."""
    path = Path(VENVS[engine].path)
    here, repo = path.absolute(), Path(__file__).resolve().parents[1] / path
    return here if here.exists() or not repo.exists() else repo


def find_python(engine: str) -> str | None:
    """The peer's venv Python when its module imports there, else None."""
    python = venv_dir(engine) / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run([str(python), "-c", f"import {VENVS[engine].module}"], capture_output=True)
    return str(python) if probe.returncode == 0 else None


def skipped_reason(engine: str) -> str:
    return f"{engine} is not installed in {VENVS[engine].path}; run {VENVS[engine].setup}"


def physical_cores() -> int:
    """Cores, not hyperthreads: what onnxruntime's CPU provider uses by default, given to the
    peers too (llama-cpp-python's default is half the logical CPUs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            cores.add((physical, value.strip()))
    return max(len(cores), 1) if cores else os.cpu_count() or 1


def prepare(names: list[str], model_folder: Path, prompts: np.ndarray, workdir: Path) -> dict:
    """What every peer's worker spec carries: the reference checkpoint (with its tokenizer), the
    f32 GGUF when llama.cpp runs, the check data and the thread count."""
    manifest = read_manifest(model_folder)
    log.info("writing the peers' reference checkpoint (same weights, with the tokenizer)")
    hf = hf_checkpoint(model_folder, workdir / "hf-peers")
    c = manifest.config
    tokenizer = Tokenizer(model_folder / manifest.tokenizer_file, c.bos_token_id, c.eos_token_id)
    prompt = prompts[0, :CHECK_PROMPT_LEN].tolist()
    check = {
        "text": CHECK_TEXT,
        "ids": tokenizer.to_tokens(CHECK_TEXT, prepend_bos=False),
        "vocab": [tokenizer.id_to_token(i) for i in range(c.vocab_size)],
        "prompt": prompt,
        "greedy": greedy_tokens(hf, prompt, CHECK_NEW_TOKENS),
    }
    spec = {"hf_folder": str(hf), "check": check, "threads": physical_cores(),
            "n_positions": c.n_positions, "workdir": str(workdir)}  # fmt: skip
    if any(PEERS[n].engine == "llama.cpp" for n in names):
        gguf = llamacpp.to_gguf(hf, workdir / "model-f32.gguf", "f32", venv=venv_dir("llama.cpp"))
        spec["gguf_f32"] = str(gguf)
    return spec
