"""Hostile model folders: every bad manifest field, a graph or tokenizer that does not belong to
the folder, and files outside it, each refused at load with one ModelFolderError that names it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from gpt2onnx.cli import main
from gpt2onnx.engine.contract import ModelFolderError, io_spec
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.model_folder import MAX_DEPTH, read_manifest


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(folder: Path, edit) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def setter(*path_and_value):
    *path, value = path_and_value

    def edit(data):
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return edit


def deleter(*path):
    def edit(data):
        for key in path[:-1]:
            data = data[key]
        del data[path[-1]]

    return edit


# (case id, edit, text the error must contain)
BAD_FIELDS = [
    ("n_layer-huge", setter("config", "n_layer", 10**9), "config.n_layer is 1000000000"),
    ("n_layer-str", setter("config", "n_layer", "2"), "config.n_layer is '2'"),
    ("n_layer-float", setter("config", "n_layer", 2.0), "config.n_layer is 2.0"),
    ("n_layer-null", setter("config", "n_layer", None), "config.n_layer is None"),
    ("n_layer-bool", setter("config", "n_layer", True), "config.n_layer is True"),
    ("n_layer-missing", deleter("config", "n_layer"), "config.n_layer is missing"),
    ("n_head-zero", setter("config", "n_head", 0), "config.n_head is 0"),
    ("n_head-not-divisor", setter("config", "n_head", 5), "a divisor of config.n_embd"),
    ("n_embd-huge", setter("config", "n_embd", 10**9), "config.n_embd"),
    ("vocab-huge", setter("config", "vocab_size", 10**12), "config.vocab_size"),
    ("positions-negative", setter("config", "n_positions", -1), "config.n_positions"),
    ("bos-negative", setter("config", "bos_token_id", -1), "config.bos_token_id is -1"),
    ("eos-str", setter("config", "eos_token_id", "x"), "config.eos_token_id is 'x'"),
    (
        "eos-past-vocab",
        lambda d: d["config"].update(eos_token_id=d["config"]["vocab_size"]),
        "config.eos_token_id",
    ),
    ("epsilon-zero", setter("config", "layer_norm_epsilon", 0), "config.layer_norm_epsilon"),
    ("activation", setter("config", "activation", "relu"), "config.activation is 'relu'"),
    ("config-list", setter("config", [1, 2]), "config is [1, 2]"),
    ("config-unknown", setter("config", "n_expert", 8), "unknown field config.n_expert"),
    ("unknown-field", setter("weights", "x"), "unknown field weights"),
    ("dtype", setter("dtype", "fp64"), "dtype is 'fp64'"),
    ("kv-cache", setter("kv_cache", 1), "kv_cache is 1"),
    ("int8-kernel-on-fp32", setter("int8_kernel", "rows"), "int8_kernel is 'rows'"),
    ("optimized-str", setter("optimized", "yes"), "optimized is 'yes'"),
    ("schema-str", setter("schema_version", "1"), "schema_version '1' is not supported"),
    ("model-file-int", setter("model_file", 123), "model_file is 123"),
    (
        "model-file-parent",
        setter("model_file", "../../other/model.onnx"),
        "model_file is '../../other/model.onnx'",
    ),
    ("model-file-absolute", setter("model_file", "/etc/passwd"), "model_file is '/etc/passwd'"),
    ("model-file-dotdot", setter("model_file", ".."), "model_file is '..'"),
    ("model-file-empty", setter("model_file", ""), "model_file is ''"),
    ("tokenizer-file-parent", setter("tokenizer_file", "../tokenizer.json"), "tokenizer_file"),
    ("external-data-absolute", setter("external_data", "/etc/passwd"), "external_data is '/etc/passwd'"),
    ("external-data-missing-file", setter("external_data", "model.onnx.data"), "model.onnx.data is missing"),
    ("source-seed", setter("source", "seed", -3), "source.seed is -3"),
    ("source-sha", setter("source", "weights_sha256", "abc"), "source.weights_sha256"),
    ("opset-str", setter("opset", "17"), "opset is '17'"),
    (
        "io-head-dim",
        lambda d: d["io"]["inputs"]["past_key_0"]["dims"].__setitem__(1, 99),
        "io is not what its config implies (inputs.past_key_0",
    ),
    ("io-missing", deleter("io"), "io is missing"),
    ("check-list", setter("check", [1]), "check is [1]"),
]


@pytest.mark.parametrize("edit, message", [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS])
def test_bad_manifest_field_is_named(tiny_fp32, tmp_path, edit, message):
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    edit_manifest(folder, edit)
    with pytest.raises(ModelFolderError) as info:
        Engine.load(folder, provider="cpu")
    text = str(info.value)
    assert message in text and "\n" not in text
    assert "manifest.json" in text or "missing" in text


def test_every_field_of_a_good_manifest_is_accepted(tiny_fp32, tiny_shared, tiny_int8):
    for folder in (tiny_fp32, tiny_shared, tiny_int8):
        manifest = read_manifest(folder)
        assert manifest.io == io_spec(manifest.config, manifest.dtype, manifest.kv_cache)


def test_shared_cache_without_fusion_is_refused(tiny_shared, tmp_path):
    folder = copy_folder(tiny_shared, tmp_path / "m")
    edit_manifest(folder, setter("optimized", False))
    with pytest.raises(ModelFolderError, match="kv_cache is 'shared'"):
        read_manifest(folder)


@pytest.mark.parametrize(
    "raw, message",
    [
        ("[" * 100_000 + "]" * 100_000, "nested deeper"),
        ('{"a": ' * (MAX_DEPTH + 2) + "1" + "}" * (MAX_DEPTH + 2), "nested deeper"),
        ('{"schema_version": 1, "config": {"layer_norm_epsilon": NaN}}', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("\xff\xfe", "not valid JSON"),
    ],
    ids=["deep-list", "deep-object", "nan", "list", "not-utf8"],
)
def test_malformed_manifest_file(tiny_fp32, tmp_path, raw, message):
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    (folder / "manifest.json").write_bytes(raw.encode("latin-1") if raw.startswith("\xff") else raw.encode())
    with pytest.raises(ModelFolderError, match=message):
        read_manifest(folder)


def test_oversized_manifest_is_not_read(tiny_fp32, tmp_path):
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    data = json.loads((folder / "manifest.json").read_text())
    data["check"] = {"padding": "x" * (2 << 20)}
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelFolderError, match="bytes, more than a manifest's"):
        read_manifest(folder)


def test_a_folder_cannot_point_at_another_folders_model(tiny_fp32, tmp_path):
    """Only a manifest and a tokenizer here; model_file reaching into a sibling folder is refused
    before anything outside the folder is opened."""
    other = copy_folder(tiny_fp32, tmp_path / "other")
    folder = tmp_path / "lonely"
    folder.mkdir()
    shutil.copy(other / "manifest.json", folder)
    shutil.copy(other / "tokenizer.json", folder)
    edit_manifest(folder, setter("model_file", "../other/model.onnx"))
    with pytest.raises(ModelFolderError, match="plain file name inside the model folder"):
        Engine.load(folder, provider="cpu")


def test_model_file_may_be_a_symlink(tiny_fp32, tmp_path):
    folder = tmp_path / "linked"
    folder.mkdir()
    for name in ("manifest.json", "tokenizer.json"):
        shutil.copy(tiny_fp32 / name, folder)
    (folder / "model.onnx").symlink_to(tiny_fp32 / "model.onnx")
    assert Engine.load(folder, provider="cpu").generate("Hi", max_new_tokens=2).completions[0].token_ids


@pytest.mark.parametrize(
    "donor, message",
    [
        ("tiny_shared", "graph input 2 is 'seqlens_k' where the manifest has 'attention_mask'"),
        ("other_heads", "graph input 'past_key_0' has shape"),
        ("tiny_fp16", "graph input 'past_key_0' is tensor(float16) where the manifest has tensor(float)"),
    ],
)
def test_a_graph_that_is_not_the_folders_own(tiny_fp32, tmp_path, request, hf_folder, donor, message):
    if donor == "other_heads":  # same layers and width, 2 heads instead of 4
        from conftest import export_folder, make_hf_model, save_hf_folder

        vocab = request.getfixturevalue("vocab")
        hf = save_hf_folder(make_hf_model(vocab, n_head=2), tmp_path / "hf2", None)
        source = export_folder(hf, tmp_path / "two-heads", tokenizer=hf_folder)
    else:
        source = request.getfixturevalue(donor)
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    shutil.copy(source / "model.onnx", folder / "model.onnx")
    with pytest.raises(ModelFolderError, match=re.escape(message)):
        Engine.load(folder, provider="cpu")


def test_a_graph_that_cannot_give_finite_logits_fails_at_load(tiny_fp32, tmp_path):
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    model = onnx.load(str(folder / "model.onnx"))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the tied wte / lm_head
    biggest.CopyFrom(
        onnx.numpy_helper.from_array(np.full(tuple(biggest.dims), np.nan, np.float32), biggest.name)
    )
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(ModelFolderError, match="expected .* and finite"):
        Engine.load(folder, provider="cpu")


def test_external_data_outside_the_folder_is_not_read(tiny_fp32, tmp_path):
    """A graph whose weights point outside its folder: onnxruntime refuses the path."""
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    model = onnx.load(str(folder / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    data = onnx.numpy_helper.to_array(tensor).tobytes()
    (tmp_path / "outside.bin").write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../outside.bin"), ("offset", "0"), ("length", str(len(data)))):
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(ModelFolderError, match="could not be loaded by onnxruntime"):
        Engine.load(folder, provider="cpu")


def write_word_tokenizer(path: Path, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_a_three_token_tokenizer_is_refused(tiny_fp32, tmp_path):
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    write_word_tokenizer(folder / "tokenizer.json", ["a", "b", "c"])
    with pytest.raises(ModelFolderError, match="is not a token of the tokenizer|does not encode and decode"):
        Engine.load(folder, provider="cpu")


def test_a_tokenizer_larger_than_the_model(tiny_fp32, tmp_path, vocab):
    """A consistent manifest for a 50-token model, with the real tokenizer beside it."""
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    edit_manifest(folder, lambda d: d["config"].update(vocab_size=50, bos_token_id=0, eos_token_id=0))
    edit_manifest(folder, lambda d: d["io"]["outputs"]["logits"]["dims"].__setitem__(2, 50))
    with pytest.raises(
        ModelFolderError, match=f"token ids up to {vocab[0] - 1} but the model's vocabulary has 50"
    ):
        Engine.load(folder, provider="cpu")


def test_oversized_tokenizer_is_not_read(tiny_fp32, tmp_path, monkeypatch):
    from gpt2onnx.engine import tokenizer

    monkeypatch.setattr(tokenizer, "MAX_TOKENIZER_BYTES", 1000)
    with pytest.raises(ModelFolderError, match="more than a tokenizer's 1000"):
        Engine.load(tiny_fp32, provider="cpu")


def test_cli_names_the_field_in_one_line(tiny_fp32, tmp_path, capsys):
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    edit_manifest(folder, setter("config", "n_layer", 10**9))
    code = main(["generate", "--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("gpt2-onnx: error:") and "config.n_layer is 1000000000" in err


def test_more_positions_than_the_graph_has(tiny_fp32, tmp_path):
    """n_positions past the graph's position table: refused at load, not at a long prompt."""
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    edit_manifest(folder, setter("config", "n_positions", 4096))
    with pytest.raises(ModelFolderError, match="the graph fails on one token"):
        Engine.load(folder, provider="cpu")


def test_cli_load_failure_is_one_line_without_onnxruntime_logs(tiny_fp32, tmp_path, capfd):
    """A kernel that fails in the load probe: onnxruntime's own log line stays quiet."""
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    edit_manifest(folder, setter("config", "n_positions", 4096))
    code = main(["generate", "--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "2"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "the graph fails on one token" in err


def test_a_manifest_that_is_a_folder_is_named(tiny_fp32, tmp_path, capfd):
    folder = copy_folder(tiny_fp32, tmp_path / "m")
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").mkdir()
    code = main(["generate", "--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "2"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "has no manifest.json" in err
