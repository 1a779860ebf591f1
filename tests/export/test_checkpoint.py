"""Checkpoint conversion both ways (our names <-> transformers' names), and hostile config.json files."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from gpt2onnx.engine.contract import GPT2Config
from gpt2onnx.export.checkpoint import (
    CheckpointError,
    convert_hf_state_dict,
    load_checkpoint,
    random_state_dict,
    to_hf_checkpoint,
)  # fmt: skip


def test_round_trip_through_transformers_names():
    config = GPT2Config(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=30)
    ours = random_state_dict(config, seed=5)
    hf_config, hf_state = to_hf_checkpoint(config, ours)
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(
        HFConfig(**{k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")})
    )
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing)
    back = convert_hf_state_dict(dict(model.state_dict()), config)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


HOSTILE_CONFIGS = [
    ({"n_layer": 10**9}, "n_layer is 1000000000"),
    ({"n_layer": "2"}, "n_layer is '2'"),
    ({"n_layer": 2.5}, "n_layer is 2.5"),
    ({"n_head": 0}, "n_head is 0"),
    ({"n_embd": 10**9}, "n_embd is 1000000000"),
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"eos_token_id": -1}, "eos_token_id is -1"),
    ({"layer_norm_epsilon": "x"}, "layer_norm_epsilon is 'x'"),
]


@pytest.mark.parametrize("change, message", HOSTILE_CONFIGS, ids=[m.split()[0] for _, m in HOSTILE_CONFIGS])
def test_hostile_checkpoint_config_is_refused_before_anything_is_sized(hf_folder, tmp_path, change, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(str(folder))


@pytest.mark.parametrize(
    "raw, message",
    [
        ("[" * 100_000 + "]" * 100_000, "nested deeper"),
        ("[1]", "not a JSON object"),
        ('{"model_type": "gpt2", "n_layer": NaN}', "not valid JSON"),
    ],
    ids=["deep", "list", "nan"],
)
def test_malformed_checkpoint_config(hf_folder, tmp_path, raw, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_folder, folder)
    (folder / "config.json").write_text(raw)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(folder))
