"""The export command's contract: bad input is one line on stderr, a non-zero exit, and no files left."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_hf_folder
from gpt2onnx.cli import main
from gpt2onnx.engine.model_folder import parse_manifest, read_manifest
from gpt2onnx.export import verify


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed (transformers' progress bars)
    code = main(["--quiet", *map(str, argv)])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("gpt2-onnx: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in err.lower(), f"{needle!r} not in {err!r}"


def assert_nothing_left(parent: Path) -> None:
    leftovers = [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers


def test_missing_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "export", "--model", tmp_path / "nope", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "export", "--model", tmp_path / "empty", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "config.json")


def test_non_gpt2_config(capsys, tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    code, err = run_cli(capsys, "export", "--model", tmp_path / "llama", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "llama", "gpt2")


@pytest.mark.parametrize("bin_format", [False, True])
def test_corrupt_weights(capsys, tmp_path, hf_model, tokenizer_dir, bin_format):
    folder = save_hf_folder(hf_model, tmp_path / "ckpt", tokenizer_dir, bin_format=bin_format)
    weights = folder / ("pytorch_model.bin" if bin_format else "model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated download
    code, err = run_cli(capsys, "export", "--model", folder, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "corrupt", weights.name)
    assert not (tmp_path / "out").exists()
    assert_nothing_left(tmp_path)


def test_weights_that_do_not_match_config(capsys, tmp_path, hf_model, tokenizer_dir):
    folder = save_hf_folder(hf_model, tmp_path / "ckpt", tokenizer_dir)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    code, err = run_cli(capsys, "export", "--model", folder, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "missing", "h.2")


def test_hub_id_while_offline_says_how_to_pass_a_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "export", "--model", "gpt2-medium", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "gpt2-medium", "local folder", "--model /path/to")


def test_unknown_random_size(capsys, tmp_path, tokenizer_dir):
    code, err = run_cli(
        capsys, "export", "--random-init", "gpt5", "--tokenizer", tokenizer_dir, "--output", tmp_path / "out"
    )
    assert_one_line_error(code, err, "unknown size", "gpt2-medium")


def test_refuses_to_overwrite_and_force_replaces(capsys, tmp_path, hf_folder):
    out = tmp_path / "model"
    assert run_cli(capsys, "export", "--model", hf_folder, "--output", out)[0] == 0
    before = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    code, err = run_cli(capsys, "export", "--model", hf_folder, "--output", out)
    assert_one_line_error(code, err, "already exists", "--force")
    assert hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest() == before
    code, _ = run_cli(capsys, "export", "--model", hf_folder, "--output", out, "--dtype", "fp16", "--force")
    assert code == 0 and read_manifest(out).dtype == "fp16"
    assert_nothing_left(tmp_path)


def test_refuses_to_replace_a_folder_that_is_not_a_model(capsys, tmp_path, hf_folder):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    code, err = run_cli(capsys, "export", "--model", hf_folder, "--output", tmp_path / "docs", "--force")
    assert_one_line_error(code, err, "not a gpt2-onnx model folder")
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"


def test_failed_check_leaves_no_folder(capsys, tmp_path, hf_folder, monkeypatch):
    monkeypatch.setitem(verify.TOLERANCES, "fp32", verify.Tolerance(atol=0.0, rtol=0.0))
    code, err = run_cli(capsys, "export", "--model", hf_folder, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "differ from PyTorch")
    assert not (tmp_path / "out").exists()
    assert_nothing_left(tmp_path)


def test_manifest_round_trip(tiny_fp32, hf_folder):
    manifest = read_manifest(tiny_fp32)
    assert parse_manifest(json.loads(manifest.to_json())) == manifest
    assert manifest.source.checkpoint == str(hf_folder.resolve()) and not manifest.source.random_init
    assert set(manifest.io["inputs"]) >= {
        "input_ids",
        "position_ids",
        "attention_mask",
        "past_key_0",
        "past_value_1",
    }
    assert manifest.io["outputs"]["present_key_0"]["dims"] == [
        "batch",
        manifest.config.n_head,
        "total_seq",
        manifest.config.head_dim,
    ]
    assert (tiny_fp32 / "tokenizer.json").is_file() and manifest.opset >= 17


def test_manifest_of_unknown_version_is_refused(tiny_fp32, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_fp32, copy)
    data = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99 is not supported"):
        read_manifest(copy)


def test_console_script_exit_code_and_stderr(tmp_path):
    """The installed entry point, in a fresh process, keeps tracebacks away from users."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2onnx",
            "export",
            "--model",
            str(tmp_path / "x"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("gpt2-onnx: error:")


def test_a_fusion_that_fails_fails_the_export(capsys, tmp_path, hf_folder, monkeypatch):
    from gpt2onnx.export import fusion

    monkeypatch.setattr(
        fusion, "expected_fusions", lambda config, kv_cache: {"MultiHeadAttention": config.n_layer + 1}
    )
    code, err = run_cli(capsys, "export", "--model", hf_folder, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "MultiHeadAttention", "--no-optimize")
    assert not (tmp_path / "out").exists()
    assert_nothing_left(tmp_path)


def test_progress_is_ours_and_library_chatter_needs_debug(capsys, tmp_path, hf_folder):
    """The default log is our few progress lines; onnxruntime's optimizer and quantizer log every
    node at INFO, which a user sees only with --debug."""
    capsys.readouterr()
    assert (
        main(["export", "--model", str(hf_folder), "--dtype", "int8", "--output", str(tmp_path / "q")]) == 0
    )
    err = capsys.readouterr().err
    assert "export check passed" in err and "quantizing weights to int8" in err
    assert "skip to quantize" not in err and "Fused SkipLayerNormalization" not in err, err
    assert len(err.splitlines()) < 20, err


def test_output_under_a_file_is_refused_before_any_work(capsys, tmp_path, hf_folder):
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(
        capsys, "export", "--model", hf_folder, "--output", tmp_path / "afile" / "sub" / "out"
    )
    assert_one_line_error(code, err, "is a file, so --output")
    assert (tmp_path / "afile").read_text() == "x"


def test_the_default_cache_is_the_shared_one_and_concat_without_fusion(capsys, tmp_path, hf_folder):
    """The shared cache is the fastest where it was measured (export/cli.py says why); the plain
    graph has no GroupQueryAttention, so --no-optimize alone gives the concat cache."""
    assert run_cli(capsys, "export", "--model", hf_folder, "--output", tmp_path / "fused")[0] == 0
    assert read_manifest(tmp_path / "fused").kv_cache == "shared"
    code, _ = run_cli(capsys, "export", "--model", hf_folder, "--no-optimize", "--output", tmp_path / "plain")
    assert code == 0 and read_manifest(tmp_path / "plain").kv_cache == "concat"


def test_int8_kernel_belongs_to_int8(capsys, tmp_path, hf_folder):
    code, err = run_cli(
        capsys, "export", "--model", hf_folder, "--int8-kernel", "blocks", "--output", tmp_path / "x"
    )
    assert_one_line_error(code, err, "--int8-kernel applies to --dtype int8 only (this export is fp32)")
    assert not (tmp_path / "x").exists()
    code, _ = run_cli(capsys, "export", "--model", hf_folder, "--dtype", "int8", "--int8-kernel", "blocks",
                      "--output", tmp_path / "blocks")  # fmt: skip
    assert code == 0 and read_manifest(tmp_path / "blocks").int8_kernel == "blocks"
