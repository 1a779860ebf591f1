"""`gpt2-onnx generate`: the JSON contract, export on first use, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpt2onnx.engine.cli import main
from test_export_cli import assert_one_line_error, run_cli


def test_json_contract(tiny_fp32):
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2onnx.engine.cli", "generate", "--model", str(tiny_fp32), "--prompt", "Hello there", "--prompt", "", "--max-new-tokens", "5", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = json.loads(proc.stdout)
    assert {"model", "provider", "completions", "timing"} <= set(out) and out["provider"] in ("cpu", "cuda")
    assert set(out["timing"]) == {"prefill_ms", "decode_ms_per_token", "tokens_per_s"} and out["timing"]["tokens_per_s"] > 0
    first, empty = out["completions"]
    assert set(first) == {"prompt", "prompt_token_ids", "token_ids", "text", "finish_reason"}
    bos = json.loads((tiny_fp32 / "manifest.json").read_text())["config"]["bos_token_id"]
    assert first["prompt"] == "Hello there" and first["prompt_token_ids"][0] == bos and len(first["prompt_token_ids"]) > 1
    assert len(first["token_ids"]) == 5 and first["finish_reason"] == "length"
    assert empty["prompt_token_ids"] == [bos] and len(empty["token_ids"]) == 5


def test_plain_and_stream_output_agree(tiny_fp32, capsys):
    args = ["generate", "--model", str(tiny_fp32), "--prompt", "Hello", "--max-new-tokens", "6"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == plain


def test_model_may_be_a_checkpoint_exported_on_first_use(hf_folder, tmp_path, capsys):
    args = ["--verbose", "generate", "--model", str(hf_folder), "--models-dir", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "3", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    exported = list(tmp_path.iterdir())
    assert len(exported) == 1 and (exported[0] / "manifest.json").is_file()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "exported earlier" in captured.err and json.loads(captured.out)["completions"] == first["completions"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt", "", "--no-bos"], "empty prompt"),
        (["--prompt", "x", "--max-new-tokens", "0"], "must be positive"),
        (["--prompt", "x", "--max-new-tokens", "500"], "context"),
        (["--prompt", "word " * 300], "context"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--top-p", "0"], "top_p"),
        (["--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["--prompt", "x", "--top-k", "-1"], "top_k"),
        (["--prompt", "x", "--logit-bias", "abc"], "ID=BIAS"),
    ],
)
def test_bad_input_is_one_line(tiny_fp32, capsys, extra, message):
    code, err = run_cli(capsys, "generate", "--model", tiny_fp32, *extra)
    assert_one_line_error(code, err, message)


def test_missing_model_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "generate", "--model", tmp_path / "none" / "x", "--prompt", "x", "--models-dir", tmp_path)
    assert_one_line_error(code, err, "does not exist")


def test_generate_exports_the_in_place_cache_on_request(hf_folder, tmp_path, capsys):
    args = ["generate", "--model", str(hf_folder), "--kv-cache", "shared", "--models-dir", str(tmp_path), "--prompt", "Hi", "--prompt", "Hello there", "--max-new-tokens", "4", "--json"]
    assert main(args) == 0
    shared = json.loads(capsys.readouterr().out)["completions"]
    assert [p.name for p in tmp_path.iterdir()][0].endswith("-fp32-shared")
    assert main(["generate", "--model", str(hf_folder), "--models-dir", str(tmp_path), "--prompt", "Hi", "--prompt", "Hello there", "--max-new-tokens", "4", "--json"]) == 0
    standard = json.loads(capsys.readouterr().out)["completions"]
    assert [c["token_ids"] for c in shared] == [c["token_ids"] for c in standard]
