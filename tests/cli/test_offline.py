"""A fresh offline machine: GPT-2's tokenizer ships in the package, and a missing optional
dependency is one line naming the pip extra that installs it, never an internal error."""

from __future__ import annotations

import json
import sys

import pytest
from test_export_cli import assert_nothing_left, assert_one_line_error, run_cli

from conftest import REFERENCE_TEXT, REFERENCE_TOKENS, SHARED_TOKENIZER, make_hf_model, save_hf_folder
from gpt2onnx.engine.contract import GPT2Config
from gpt2onnx.engine.extras import MissingExtraError, needs_extra, require
from gpt2onnx.export.checkpoint import CheckpointError
from gpt2onnx.export.tokenizer_files import PACKAGED_GPT2, find_tokenizer, packaged_gpt2_json, write_tokenizer

GPT2_VOCAB = (50257, 50256)  # size, id of <|endoftext|>
TEXTS = [
    REFERENCE_TEXT,
    "  leading spaces,\ttabs\nand newlines\r\n\n",
    "héllo wörld — naïve café “quotes” 日本語のテキスト emoji 🙂🚀 ✓",
    "def f(x):\n    return x**2  # code 12345 3.14159 0xFF",
    "<|endoftext|>Special token in the middle<|endoftext|> and   its neighbours",
    "Don't won't I'm they've we'll y'all 's 'S",
]


@pytest.fixture
def packaged():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(packaged_gpt2_json())


def test_packaged_tokenizer_gives_the_golden_ids_without_shared(packaged):
    ids = packaged.encode(REFERENCE_TEXT, add_special_tokens=False).ids
    assert [50256, *ids] == REFERENCE_TOKENS
    assert packaged.get_vocab_size(with_added_tokens=True) == 50257
    assert packaged.token_to_id("<|endoftext|>") == 50256


@pytest.mark.skipif(
    not (SHARED_TOKENIZER / "tokenizer.json").is_file(),
    reason="needs the real GPT-2 tokenizer at ../shared/gpt2-tokenizer",
)
def test_packaged_tokenizer_is_the_shared_one(packaged):
    from tokenizers import Tokenizer

    shared = Tokenizer.from_file(str(SHARED_TOKENIZER / "tokenizer.json"))
    assert packaged.get_vocab(with_added_tokens=True) == shared.get_vocab(with_added_tokens=True)
    for text in TEXTS:
        for special in (False, True):
            ours, theirs = (t.encode(text, add_special_tokens=special).ids for t in (packaged, shared))
            assert ours == theirs, text
    assert packaged_gpt2_json() == (SHARED_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8")


def test_random_init_without_tokenizer_gets_the_packaged_one(tmp_path, caplog):
    caplog.set_level("INFO", logger="gpt2onnx")
    source = find_tokenizer(None, None, hub_fallback="gpt2")  # what the exporter asks for --random-init
    assert source == PACKAGED_GPT2 and "shipped with gpt2-onnx" in caplog.text
    write_tokenizer(source, tmp_path, GPT2Config(n_layer=1, n_head=1, n_embd=8))
    assert (tmp_path / "tokenizer.json").read_text(encoding="utf-8") == packaged_gpt2_json()


def test_gpt2_checkpoint_without_tokenizer_exports_offline_with_a_warning(capsys, tmp_path):
    folder = save_hf_folder(make_hf_model(GPT2_VOCAB), tmp_path / "ckpt", tokenizer_dir=None)
    code, err = run_cli(capsys, "export", "--model", folder, "--output", tmp_path / "out")
    assert code == 0, err
    assert "has no tokenizer: using GPT-2's" in err and err.count("\n") == 1, err
    assert (tmp_path / "out" / "tokenizer.json").read_text(encoding="utf-8") == packaged_gpt2_json()


def test_checkpoint_with_a_smaller_vocabulary_and_no_tokenizer_says_so(tmp_path):
    message = r"has no tokenizer, and GPT-2's has 50257 tokens .* 400.*--tokenizer"
    config = GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=400, bos_token_id=399, eos_token_id=399)
    with pytest.raises(CheckpointError, match=message):
        write_tokenizer(PACKAGED_GPT2, tmp_path, config)


@pytest.fixture
def hide_modules():
    """hide(NAME, ...): `import NAME` fails as if NAME were not installed; modules under `reimport`
    are dropped so that they import again. sys.modules and package attributes are restored after."""
    saved = dict(sys.modules)

    def hide(*names: str, reimport: tuple[str, ...] = ()) -> None:
        for key in list(sys.modules):
            if key.partition(".")[0] in names or key.startswith(reimport):
                del sys.modules[key]
        for name in names:
            sys.modules[name] = None

    yield hide
    for key in [k for k in sys.modules if k not in saved]:
        del sys.modules[key]
    sys.modules.update(saved)
    for key, module in saved.items():
        parent, _, child = key.rpartition(".")
        if key.startswith("gpt2onnx.") and saved.get(parent) is not None:
            setattr(saved[parent], child, module)


def test_export_without_torch_names_the_export_extra(capsys, tmp_path, hide_modules):
    hide_modules("torch", reimport=("gpt2onnx.export.",))
    code, err = run_cli(capsys, "export", "--random-init", "gpt2", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "needs torch", "pip install 'gpt2-onnx[export]'")
    assert "internal error" not in err and not (tmp_path / "out").exists()


def test_int8_export_without_onnx_ir_names_the_export_extra(capsys, tmp_path, hf_folder, hide_modules):
    hide_modules("onnx_ir", reimport=("onnxruntime.quantization.matmul_nbits_quantizer",))
    code, err = run_cli(
        capsys, "export", "--model", hf_folder, "--dtype", "int8", "--output", tmp_path / "out"
    )
    assert_one_line_error(code, err, "--dtype int8 needs onnx_ir", "pip install 'gpt2-onnx[export]'")
    assert not (tmp_path / "out").exists()
    assert_nothing_left(tmp_path)


def test_bench_without_matplotlib_keeps_the_results_and_skips_the_plots(
    capsys, tmp_path, tiny_fp32, hide_modules
):
    hide_modules("matplotlib")
    out = tmp_path / "bench"
    argv = ["--model", tiny_fp32, "--out", out, "--provider", "cpu", "--baselines", "", "--batches", "1"]
    code, err = run_cli(capsys, "bench", *argv, "--prompt-lens", "4", "--new-tokens", "3", "--repeats", "1")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "plots skipped" in lines[0], err
    assert "matplotlib" in lines[0] and "pip install 'gpt2-onnx[bench]'" in lines[0], err
    assert json.loads((out / "results.json").read_text())["runners"]["gpt2-onnx"]["results"]
    assert (out / "results.md").is_file() and not list(out.glob("*.png"))


@pytest.mark.parametrize("baseline, missing", [("transformers-eager", "transformers"), ("optimum", "torch")])
def test_bench_baseline_without_its_module_fails_before_the_sweep(
    capsys, tmp_path, tiny_fp32, hide_modules, baseline, missing
):
    hide_modules(missing)
    argv = ["--model", tiny_fp32, "--out", tmp_path / "bench", "--baselines", baseline, "--batches", "1"]
    code, err = run_cli(capsys, "bench", *argv, "--prompt-lens", "4", "--new-tokens", "3", "--repeats", "1")
    needles = (f"the {baseline} baseline needs {missing}", "pip install 'gpt2-onnx[bench]'")
    assert_one_line_error(code, err, *needles, "--baselines ort-plain-loop")
    assert not (tmp_path / "bench").exists()


def test_only_a_third_party_module_is_a_missing_extra(hide_modules):
    hide_modules("onnx_ir")
    with pytest.raises(MissingExtraError, match=r"int8 needs onnx_ir.*gpt2-onnx\[export\]"):
        require("onnx_ir.passes", "export", "int8")
    with pytest.raises(ModuleNotFoundError) as exc, needs_extra("export", "exporting"):
        import gpt2onnx.no_such_module  # noqa: F401
    assert not isinstance(exc.value, MissingExtraError)
