"""Shared fixtures: a tokenizer, tiny random GPT-2 checkpoints saved by transformers, and their exports.

The real GPT-2 tokenizer is used: ../shared/gpt2-tokenizer when it exists, otherwise the copy
that ships inside the package, so the suite passes on a machine without ../shared.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO.parent / "shared" / "gpt2-tokenizer"
FIXTURES_DIR = REPO.parent / "shared" / "fixtures"  # trained models (README there); may be absent
# The walkthrough's golden tokens: GPT-2's tokenizer on its sentence (TransformerLens's to_tokens).
REFERENCE_TEXT = "I am an amazing autoregressive, decoder-only, GPT-2 style transformer. One day I will exceed human level intelligence and take over the world!"
REFERENCE_TOKENS = [
    int(t)
    for t in "50256 40 716 281 4998 1960 382 19741 11 875 12342 12 8807 11 402 11571 12 17 3918 47385 13 1881 1110 314 481 7074 1692 1241 4430 290 1011 625 262 995 0".split()
]
TINY = dict(n_layer=2, n_head=4, n_embd=32, n_positions=128)


@pytest.fixture(autouse=True, scope="session")
def _offline():
    """No test may reach the network; hub lookups then fail fast instead of timing out."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real GPT-2 tokenizer: ../shared's when present, else the copy shipped in the package
    (the same file), so a machine without ../shared runs the same tests on the same ids."""
    if (SHARED_TOKENIZER / "tokenizer.json").is_file():
        return SHARED_TOKENIZER
    from gpt2onnx.export.tokenizer_files import packaged_gpt2_json

    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "tokenizer.json").write_text(packaged_gpt2_json(), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def vocab(tokenizer_dir) -> tuple[int, int]:
    """(vocab size, id of <|endoftext|>) of the tokenizer in use."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return tok.get_vocab_size(), tok.token_to_id("<|endoftext|>")


def make_hf_model(vocab, seed: int = 0, **dims):
    """A GPT2LMHeadModel with seeded random weights, LayerNorm gains and biases included."""
    from transformers import GPT2Config, GPT2LMHeadModel

    size, eot = vocab
    config = GPT2Config(vocab_size=size, bos_token_id=eot, eos_token_id=eot, **{**TINY, **dims})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial, so a swapped gain or bias shows
    return model


def save_hf_folder(model, folder: Path, tokenizer_dir: Path | None, bin_format: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if bin_format:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    if tokenizer_dir is not None:
        shutil.copyfile(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def hf_model(vocab):
    return make_hf_model(vocab)


@pytest.fixture(scope="session")
def hf_folder(hf_model, tokenizer_dir, tmp_path_factory) -> Path:
    return save_hf_folder(hf_model, tmp_path_factory.mktemp("hf") / "tiny", tokenizer_dir)


def export_folder(src: Path | str | None, out: Path, **kw) -> Path:
    from gpt2onnx.export.exporter import ExportConfig, export

    export(ExportConfig(output=out, model=str(src) if src else None, **kw))
    return out


def make_varied_model(vocab, scale: float = 20.0, **dims):
    """The tiny model with its weight matrices scaled up (20x by default): `tiny_fp32`'s 0.1 biases outweigh its
    0.02 weights, so it says one token whatever the prompt; this one's greedy tokens change from
    step to step and from prompt to prompt, so a broken conversion or a stale input shows."""
    model = make_hf_model(vocab, **dims)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # wte, wpe and every projection; not LayerNorm gains or biases
                p.mul_(scale)
    return model


@pytest.fixture(scope="session")
def varied_hf_folder(vocab, tokenizer_dir, tmp_path_factory) -> Path:
    return save_hf_folder(make_varied_model(vocab), tmp_path_factory.mktemp("varied") / "hf", tokenizer_dir)


# The session's exported folders, each made once on first use: fixture name -> (the source folder's
# fixture, export options). tiny_* come from `hf_folder`, varied_* from `varied_hf_folder`.
EXPORTS = {
    "tiny_fp32": ("hf_folder", {}),
    "tiny_fp16": ("hf_folder", {"dtype": "fp16"}),
    "tiny_fp32_plain": ("hf_folder", {"optimize": False}),  # the unfused graph: standard ONNX ops only
    "tiny_shared": (
        "hf_folder",
        {"kv_cache": "shared"},
    ),  # fixed-size, updated in place (GroupQueryAttention)
    "tiny_fp16_shared": ("hf_folder", {"dtype": "fp16", "kv_cache": "shared"}),  # the GPU's default
    "tiny_int8": ("hf_folder", {"dtype": "int8"}),
    "tiny_int8_shared": ("hf_folder", {"dtype": "int8", "kv_cache": "shared"}),
    "tiny_int4": ("hf_folder", {"dtype": "int4"}),
    "tiny_int4_shared": ("hf_folder", {"dtype": "int4", "kv_cache": "shared"}),
    "varied_fp32": ("varied_hf_folder", {}),
    "varied_shared": ("varied_hf_folder", {"kv_cache": "shared"}),
    "varied_int8_shared": ("varied_hf_folder", {"dtype": "int8", "kv_cache": "shared"}),
    # with the inspection graph (run_with_cache); external data, so it shares model.onnx.data
    "varied_inspect": ("varied_hf_folder", {"inspect": True, "external_data_threshold": 0}),
    "varied_fp16_inspect": ("varied_hf_folder", {"dtype": "fp16", "inspect": True}),
}


def _exported(name: str, source: str, options: dict):
    @pytest.fixture(scope="session", name=name)
    def fixture(request, tmp_path_factory) -> Path:
        return export_folder(
            request.getfixturevalue(source), tmp_path_factory.mktemp("export") / name, **options
        )

    return fixture


for _name, (_source, _options) in EXPORTS.items():
    globals()[_name] = _exported(_name, _source, _options)


def hf_forward(model, ids, mask, positions, cache=None):
    """One GPT2LMHeadModel call; returns (logits, cache). transformers renamed past_key_values to cache."""
    kwargs = dict(
        attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(positions), use_cache=True
    )
    if cache is not None:
        kwargs["cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"] = (
            cache
        )
    with torch.no_grad():
        out = model(torch.from_numpy(ids), **kwargs)
    return out.logits.numpy(), out.past_key_values


def hf_cache_arrays(cache) -> list[np.ndarray]:
    """key_0, value_0, key_1, ... as numpy, in the graph contract's order."""
    return [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]


def left_padded(lengths: list[int], gen: np.random.Generator, vocab_size: int):
    """Random token rows of the given lengths, left-padded: (ids, mask, positions)."""
    width = max(lengths)
    ids = gen.integers(0, vocab_size, (len(lengths), width), dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def run_flags(capsys, *argv) -> tuple[int, str]:
    """The `gpt2-onnx` command in-process: (exit code, stderr). A flag argparse cannot parse ends
    in SystemExit(2), as argparse's own errors do; a value checked after parsing is a return code."""
    from gpt2onnx.cli import main

    capsys.readouterr()
    try:
        code = main(["--quiet", *map(str, argv)])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err
