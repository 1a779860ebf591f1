"""llama.cpp's OpenAI-compatible server as the load benchmark's peer, on the same weights.

A model folder's weights (regenerated from the seed for random-init, re-read for a checkpoint:
reference.write_hf_reference) are written as a transformers GPT-2 checkpoint, converted to GGUF with
the converter in llama.cpp's own source tree, and served by llama-cpp-python's server. All of
llama.cpp lives in its own venv, .venv-llamacpp (made by .ci/setup-llamacpp: the package built
from source for this CPU, and its sdist kept unpacked under .venv-llamacpp/src for the
converter), and runs here as subprocesses, so this module imports without llama_cpp installed.

What llama-cpp-python's server (0.3.36; llama_cpp/server/app.py and settings.py) can do, checked
against a running one on the 124M q8_0 GGUF:
- One request at a time: every completion holds one global lock around a single llama.cpp
  context, so concurrent requests wait in line. No parallel slots, no continuous batching, no
  n_parallel setting. Those are in llama.cpp's C++ `llama-server`, which the wheel does not ship
  but `.ci/setup-llamacpp --llama-server` builds from the same tree (start_llama_server).
- `interrupt_requests` is on by default: a new request cancels a running *stream*. start_server
  turns it off, or a load test would measure cancelled streams.
- `prompt` is a string or a list of one string; token ids are refused (HTTP 500 carrying the
  validation error). `text_prompt` makes a string that tokenizes back to exactly len(ids) tokens.
- No BOS is added for GPT-2 (the GGUF says add_bos_token false); ours prepends <|endoftext|>.
  Special tokens in the prompt string are parsed, so "<|endoftext|>" + text matches ours.
- `ignore_eos` is silently ignored (generation still stops at EOS). `min_tokens` equal to
  `max_tokens` masks EOS until then (completion_body). A `logit_bias` sent with `min_tokens` is
  silently dropped. Greedy is temperature 0 with repeat_penalty 1 (the server defaults to 1.1).
- Streaming sends one chunk per token, except that a token ending inside a UTF-8 character is
  held back and goes out with the next (so chunks can be fewer than tokens), then a chunk with
  empty text and the finish_reason, then `data: [DONE]`; no usage. With min_tokens, a stream
  that ends with finish_reason "length" had exactly max_tokens tokens.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from gpt2onnx.engine.contract import UserError

log = logging.getLogger(__name__)

VENV = Path(".venv-llamacpp")  # made by .ci/setup-llamacpp; relative to the repository root
SETUP = "run .ci/setup-llamacpp (builds llama-cpp-python[server] in .venv-llamacpp, about 10 minutes)"


def llamacpp_python(venv: Path = VENV) -> Path:
    """The venv's Python (absolute, not resolved: a venv python is a symlink).
    Raises UserError when the venv is missing."""
    python = Path(venv, "bin", "python").absolute()
    if not python.exists():
        raise UserError(f"{venv} is missing, so llama.cpp cannot run here; {SETUP}")
    return python


def converter(venv: Path = VENV) -> Path:
    """convert_hf_to_gguf.py in the llama.cpp tree vendored in the kept sdist.
    Raises UserError when it is missing."""
    found = sorted(Path(venv, "src").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        raise UserError(f"llama.cpp's convert_hf_to_gguf.py is not under {venv}/src; {SETUP}")
    return found[-1].absolute()


def to_gguf(checkpoint: Path, out_file: Path, outtype: str = "q8_0", venv: Path = VENV) -> Path:
    """Convert a transformers checkpoint folder to one GGUF file with llama.cpp's converter and
    the gguf-py beside it (not PyPI's `gguf`, which lags the converter). outtype: f32, f16,
    bf16 or q8_0 (the match for our int8). Raises UserError (no venv) or RuntimeError (the
    converter failed; its last output lines in the message)."""
    script = converter(venv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(script.parent / "gguf-py"),
                                                                    os.environ.get("PYTHONPATH")])))  # fmt: skip
    env["HF_HUB_OFFLINE"] = "1"  # everything is local; a hub lookup would only time out
    out_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(llamacpp_python(venv)), str(script), str(checkpoint), "--outfile", str(out_file),
           "--outtype", outtype]  # fmt: skip
    log.info("converting %s to %s (%s) with %s", checkpoint, out_file, outtype, script)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out_file.is_file():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {checkpoint} (exit {done.returncode}):\n{tail}")
    return out_file


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(gguf_file: Path, port: int, n_parallel: int = 1, n_ctx: int = 1024, threads: int = 2,
                 model_alias: str = "gpt2", venv: Path = VENV, log_file: Path | None = None,
                 ) -> subprocess.Popen:  # fmt: skip
    """`python -m llama_cpp.server` on 127.0.0.1:port, serving gguf_file as `model_alias`.
    n_parallel must be 1: llama-cpp-python's server runs one request at a time (module
    docstring). logits_all off: prompts do not compute logits at every position (nothing here
    asks for prompt logprobs). Output goes to log_file (else discarded). Raises ValueError
    (n_parallel != 1), UserError (no venv)."""
    if n_parallel != 1:
        raise ValueError(
            f"n_parallel={n_parallel}: llama-cpp-python's server has no parallel slots or continuous "
            "batching (it serves one request at a time); pass n_parallel=1, or use start_llama_server"
        )
    cmd = [str(llamacpp_python(venv)), "-m", "llama_cpp.server", "--model", str(gguf_file),
           "--model_alias", model_alias, "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--interrupt_requests", "False", "--logits_all", "False"]  # fmt: skip
    return _spawn(cmd, log_file)


def _spawn(cmd: list[str], log_file: Path | None) -> subprocess.Popen:
    """The server in its own session, its output in log_file (else discarded)."""
    if log_file is None:
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
    with open(log_file, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_llama_server(gguf_file: Path, port: int, n_parallel: int = 16, n_ctx: int = 1024, threads: int = 2,
                       model_alias: str = "gpt2", venv: Path = VENV, log_file: Path | None = None,
                       ) -> subprocess.Popen:  # fmt: skip
    """llama.cpp's C++ `llama-server` (`.ci/setup-llamacpp --llama-server`) on 127.0.0.1:port:
    n_parallel slots of n_ctx tokens each, with continuous batching (its default). Unlike
    llama-cpp-python's server it takes token-id prompts and `ignore_eos`, and streams `usage`.
    Raises UserError when the binary is missing."""
    binary = Path(venv, "bin", "llama-server").absolute()
    if not binary.exists():
        raise UserError(f"{binary} is missing; run .ci/setup-llamacpp --llama-server (about 8 minutes)")
    cmd = [str(binary), "--model", str(gguf_file), "--alias", model_alias, "--host", "127.0.0.1",
           "--port", str(port), "--parallel", str(n_parallel), "--ctx-size", str(n_ctx * n_parallel),
           "--threads", str(threads), "--threads-batch", str(threads), "--cont-batching"]  # fmt: skip
    return _spawn(cmd, log_file)


def wait_ready(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll GET /v1/models until the server answers 200. Raises RuntimeError when proc exits
    first, TimeoutError after timeout seconds."""
    url = f"http://127.0.0.1:{port}/v1/models"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the llama.cpp server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet
        time.sleep(0.2)
    raise TimeoutError(f"the llama.cpp server on port {port} was not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after timeout seconds; returns the exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def completion_body(prompt: str, max_tokens: int, stream: bool = False, model: str = "gpt2") -> dict:
    """A greedy /v1/completions request that generates exactly max_tokens tokens on
    llama-cpp-python's server (min_tokens stands in for ignore_eos)."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "temperature": 0, "repeat_penalty": 1.0, "stream": stream}  # fmt: skip


def text_prompt(ids: list[int], tokenizer_file: Path) -> str:
    """A string that GPT-2's tokenizer turns back into exactly len(ids) tokens, for a server that
    takes no token ids: each id is replaced by a round-trip word token (" " + letters, itself a
    whole pre-token, so a run of them encodes to the same ids), picked by id modulo their count."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    vocab = tok.get_vocab()
    words = sorted(i for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha())
    encoded = tok.encode_batch([tok.decode([i]) for i in words], add_special_tokens=False)
    words = [i for i, e in zip(words, encoded) if e.ids == [i]]
    return tok.decode([words[i % len(words)] for i in ids])
