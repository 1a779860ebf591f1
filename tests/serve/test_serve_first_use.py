"""`gpt2-onnx serve` from the first command: it takes what `generate` takes, so a checkpoint (here
the tiny Hugging Face folder) is exported with the shared cache into --models-dir on first use and
served; a concat-cache folder is refused with the two ways out; the dtype of a first-use export
follows where the server runs; and the help says each default once."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_flags
from gpt2onnx.cli import build_parser
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.model_folder import read_manifest
from gpt2onnx.export.cli import HelpFormatter

httpx = pytest.importorskip("httpx", reason="the HTTP test needs httpx")
pytest.importorskip("fastapi", reason="the server needs the [serve] extra")

NO_EOS = {"50256": -100}


def health_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_exports_a_checkpoint_with_the_shared_cache_on_first_use_and_answers(hf_folder, tmp_path):
    models = tmp_path / "models"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2onnx", "serve", "--model", str(hf_folder), "--models-dir", str(models),
         "--provider", "cpu", "--port", "0", "--served-model-name", "tiny"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        lines = []
        while not lines or "gpt2-onnx: serving" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1], f"the server ended before serving:\n{''.join(lines)}"
        url = lines[-1].split(" on ", 1)[1].split()[0]
        deadline = time.monotonic() + 60  # the line can come a moment before uvicorn accepts
        while not health_ok(url.removesuffix("/v1") + "/health"):
            assert time.monotonic() < deadline and proc.poll() is None, "the server never answered /health"
            time.sleep(0.05)
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "logit_bias": NO_EOS}
        got = httpx.post(url + "/completions", json=body, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert got.status_code == 200 and code == 0, got.text
    (folder,) = models.iterdir()
    assert folder.name.endswith("-fp32-shared") and read_manifest(folder).kv_cache == "shared"
    alone = Engine.load(folder, provider="cpu").generate(
        "Hello", max_new_tokens=8, logit_bias={50256: -100.0}
    )
    assert got.json()["choices"][0]["text"] == alone.completions[0].text


def test_a_concat_cache_folder_is_refused_with_both_ways_out(capsys, tiny_fp32, hf_folder):
    code, err = run_flags(capsys, "serve", "--model", tiny_fp32, "--port", "0", "--provider", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--kv-cache shared" in err and f"--model {hf_folder.resolve()}" in err, err


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--model", "gpt2", *argv])


@pytest.mark.parametrize(
    "argv, dtype",
    [
        (["--provider", "cpu"], "fp32"),
        (["--provider", "cpu", "--dtype", "int8"], "int8"),
        (["--ray", "--replica-gpus", "1"], "fp16"),  # GroupQueryAttention runs on CUDA in fp16 only
        (["--ray", "--provider", "cuda"], "fp16"),
        (["--ray"], "fp32"),  # replicas without a GPU
    ],
)
def test_a_first_use_export_takes_the_dtype_of_where_the_server_runs(argv, dtype):
    from gpt2onnx.serve.cli import first_use_dtype

    assert first_use_dtype(serve_args(*argv)) == dtype


@pytest.mark.parametrize("command", ["serve", "export"])
def test_help_says_each_default_once(command):
    parser = build_parser().commands[command]
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("default") <= 1, (action.dest, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (action.dest, text)
        if action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
            assert "default" in text, (action.dest, text)  # every default is shown
