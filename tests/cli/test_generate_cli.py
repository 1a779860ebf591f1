"""`gpt2-onnx generate`: the JSON contract, export on first use, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_export_cli import assert_one_line_error, run_cli

from conftest import run_flags
from gpt2onnx.cli import main


def test_json_contract(tiny_fp32):
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2onnx", "generate", "--model", str(tiny_fp32), "--prompt", "Hello there", "--prompt", "", "--max-new-tokens", "5", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = json.loads(proc.stdout)
    assert {"model", "provider", "completions", "timing"} <= set(out) and out["provider"] in ("cpu", "cuda")
    assert (
        set(out["timing"]) == {"prefill_ms", "decode_ms_per_token", "tokens_per_s"}
        and out["timing"]["tokens_per_s"] > 0
    )
    first, empty = out["completions"]
    assert set(first) == {"prompt", "prompt_token_ids", "token_ids", "text", "finish_reason"}
    bos = json.loads((tiny_fp32 / "manifest.json").read_text())["config"]["bos_token_id"]
    assert (
        first["prompt"] == "Hello there"
        and first["prompt_token_ids"][0] == bos
        and len(first["prompt_token_ids"]) > 1
    )
    assert len(first["token_ids"]) == 5 and first["finish_reason"] == "length"
    assert empty["prompt_token_ids"] == [bos] and len(empty["token_ids"]) == 5


def test_plain_and_stream_output_agree(tiny_fp32, capsys):
    args = ["generate", "--model", str(tiny_fp32), "--prompt", "Hello", "--max-new-tokens", "6"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == plain


def test_model_may_be_a_checkpoint_exported_on_first_use(hf_folder, tmp_path, capsys):
    args = [
        "--verbose",
        "generate",
        "--model",
        str(hf_folder),
        "--models-dir",
        str(tmp_path),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "3",
        "--json",
    ]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    exported = list(tmp_path.iterdir())
    assert len(exported) == 1 and (exported[0] / "manifest.json").is_file()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert (
        "exported earlier" in captured.err and json.loads(captured.out)["completions"] == first["completions"]
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--prompt", "", "--no-bos"], "empty prompt"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
        (["--prompt", "x", "--max-new-tokens", "500"], "context"),
        (["--prompt", "word " * 300], "context"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
        (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--prompt", "x", "--top-k", "-1"], "--top-k must be >= 0"),
        (["--prompt", "x", "--logit-bias", "abc"], "ID=BIAS"),
    ],
)
def test_bad_input_is_one_line(tiny_fp32, capsys, extra, message):
    code, err = run_flags(capsys, "generate", "--model", tiny_fp32, *extra)
    assert_one_line_error(code, err, message)


def test_missing_model_folder(capsys, tmp_path):
    code, err = run_cli(
        capsys, "generate", "--model", tmp_path / "none" / "x", "--prompt", "x", "--models-dir", tmp_path
    )
    assert_one_line_error(code, err, "does not exist")


def test_generate_exports_the_in_place_cache_on_request(hf_folder, tmp_path, capsys):
    args = [
        "generate",
        "--model",
        str(hf_folder),
        "--kv-cache",
        "shared",
        "--models-dir",
        str(tmp_path),
        "--prompt",
        "Hi",
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "4",
        "--json",
    ]
    assert main(args) == 0
    shared = json.loads(capsys.readouterr().out)["completions"]
    assert [p.name for p in tmp_path.iterdir()][0].endswith("-fp32-shared")
    assert (
        main(
            [
                "generate",
                "--model",
                str(hf_folder),
                "--models-dir",
                str(tmp_path),
                "--prompt",
                "Hi",
                "--prompt",
                "Hello there",
                "--max-new-tokens",
                "4",
                "--json",
            ]
        )
        == 0
    )
    standard = json.loads(capsys.readouterr().out)["completions"]
    assert [c["token_ids"] for c in shared] == [c["token_ids"] for c in standard]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--max-new-tokens", "abc"], "--max-new-tokens: invalid int value"),
        (["--top-k", "2.5"], "--top-k: invalid int value"),
        (["--provider", "gpu"], "--provider: invalid choice"),
        (["--truncate", "right"], "--truncate: invalid choice"),
        (["--presence-penalty", "nan"], "--presence-penalty: 'nan' is not a finite number"),
        (["--frequency-penalty", "inf"], "--frequency-penalty: 'inf' is not a finite number"),
        (["--temperature=-inf"], "--temperature: '-inf' is not a finite number"),
        (["--top-p", "NaN"], "--top-p: 'NaN' is not a finite number"),
        (["--presence-penalty", "3"], "--presence-penalty must be in [-2, 2]"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be in"),
        (["--temperature", "1e-300"], "--temperature must be >= 0"),
        (["--logit-bias", "5=nan"], "--logit-bias: '5=nan' is not ID=BIAS"),
        (["--logit-bias", "1.5=100"], "--logit-bias: '1.5=100' is not ID=BIAS"),
        (["--logit-bias", "5=1e9"], "--logit-bias[5] must be a finite number"),
        (["--logit-bias=-1=5"], "--logit-bias key -1 is outside the vocabulary"),
        (["--seed", "-1"], "--seed must be a non-negative integer"),
        (["--max-batch", "0"], "--max-batch must be a positive integer"),
        (["--max-batch", "100000"], "--max-batch must be a positive integer"),
        (["--stop", ""], "--stop[0] must be a non-empty str"),
        (["--num-beams", "0"], "--num-beams must be from 1 to --max-batch (8"),
        (["--num-beams", "9"], "--num-beams must be from 1 to --max-batch (8"),
        (
            ["--num-beams", "3", "--num-return-sequences", "4"],
            "--num-return-sequences must be from 1 to --num-beams (3)",
        ),
        (["--num-return-sequences", "2"], "--num-return-sequences must be from 1 to --num-beams (1)"),
        (["--num-beams", "2", "--stream"], "--stream does not apply to beam search"),
        (["--early-stopping", "soon"], "--early-stopping: invalid choice"),
        (["--length-penalty", "nan"], "--length-penalty: 'nan' is not a finite number"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it_before_any_model_is_touched(tmp_path, capsys, flags, message):
    """One line, exit 2, the subcommand's --help; the model "M" is never looked up (else the error
    would be that it does not exist) and nothing is exported into --models-dir."""
    code, err = run_flags(
        capsys, "generate", "--model", "M", "--prompt", "x", *flags, "--models-dir", tmp_path
    )
    assert code == 2
    assert_one_line_error(code, err, message, "; see gpt2-onnx generate --help")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv,message,command",
    [
        ([], "required: command", "gpt2-onnx"),
        (["gen"], "invalid choice: 'gen'", "gpt2-onnx"),
        (["generate", "--model", "M"], "required: --prompt", "gpt2-onnx generate"),
        (["generate", "--prompt", "x"], "--model --random-init is required", "gpt2-onnx generate"),
        (
            ["--bogus", "generate", "--model", "M", "--prompt", "x"],
            "unrecognized arguments",
            "gpt2-onnx generate",
        ),
        (["export", "--random-init", "tiny", "--output", "x", "--bogus"], "unrecognized", "gpt2-onnx export"),
        (["bench", "--model", "M", "--repeats", "many"], "--repeats: invalid int value", "gpt2-onnx bench"),
    ],
)
def test_every_command_reports_flag_errors_in_one_line(capsys, argv, message, command):
    code, err = run_flags(capsys, *argv)
    assert_one_line_error(code, err, message, f"; see {command} --help")
    assert code == 2 and "usage:" not in err


def test_help_is_still_the_whole_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: gpt2-onnx generate")
    assert "--presence-penalty" in out and out.count("\n") > 30


def test_beam_search_json_is_transformers(varied_shared, vocab, capsys):
    """--num-beams with --json: every returned hypothesis with its score, as transformers' generate
    gives them (tests/engine/test_beam.py has the other cases)."""
    import torch

    from conftest import make_varied_model

    code = main(["generate", "--model", str(varied_shared), "--prompt", "The quick brown fox", "--max-new-tokens",
                 "9", "--num-beams", "5", "--num-return-sequences", "3", "--length-penalty", "0.6",
                 "--early-stopping", "never", "--json"])  # fmt: skip
    assert code == 0
    (completion,) = json.loads(capsys.readouterr().out)["completions"]
    prompt = completion["prompt_token_ids"]
    with torch.no_grad():
        out = make_varied_model(vocab).generate(
            torch.tensor([prompt]), max_new_tokens=9, num_beams=5, num_return_sequences=3, length_penalty=0.6,
            early_stopping="never", do_sample=False, return_dict_in_generate=True, output_scores=True,
            pad_token_id=vocab[1])  # fmt: skip
    beams = completion["beams"]
    assert [b["token_ids"] for b in beams] == [out.sequences[i, len(prompt) :].tolist() for i in range(3)]
    assert [round(b["score"], 4) for b in beams] == [round(float(s), 4) for s in out.sequences_scores]
    assert completion["token_ids"] == beams[0]["token_ids"] and {b["finish_reason"] for b in beams} == {
        "length"
    }


def test_beam_search_exports_the_shared_cache_on_first_use(hf_folder, tmp_path, capsys):
    code = main(["generate", "--model", str(hf_folder), "--models-dir", str(tmp_path), "--prompt", "Hi",
                 "--max-new-tokens", "3", "--num-beams", "2", "--json"])  # fmt: skip
    assert code == 0 and len(json.loads(capsys.readouterr().out)["completions"][0]["beams"]) == 1
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "manifest.json").read_text())["kv_cache"] == "shared"
