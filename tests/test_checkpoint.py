"""Checkpoint conversion both ways: our names <-> transformers' names."""

from __future__ import annotations

import torch

from gpt2onnx.engine.contract import GPT2Config
from gpt2onnx.export.checkpoint import convert_hf_state_dict, random_state_dict, to_hf_checkpoint


def test_round_trip_through_transformers_names():
    config = GPT2Config(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=30)
    ours = random_state_dict(config, seed=5)
    hf_config, hf_state = to_hf_checkpoint(config, ours)
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    model = GPT2LMHeadModel(HFConfig(**{k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}))
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing)
    back = convert_hf_state_dict(dict(model.state_dict()), config)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
