"""The weights every baseline runs: the model folder's exact weights as a transformers GPT-2
folder (regenerated from the seed for random-init, re-read and sha256-checked for checkpoints),
and transformers' greedy tokens on them, which the full-precision peers must reproduce."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gpt2onnx.engine.contract import Manifest
from gpt2onnx.engine.model_folder import read_manifest


def write_hf_reference(manifest: Manifest, folder: Path) -> None:
    """A transformers folder with the exact weights the model folder was exported from."""
    from safetensors.torch import save_file

    from gpt2onnx.export.checkpoint import (
        CheckpointError,
        load_checkpoint,
        random_state_dict,
        to_hf_checkpoint,
    )

    src = manifest.source
    if src.random_init:
        state = random_state_dict(manifest.config, src.seed)
    else:
        ckpt = load_checkpoint(src.checkpoint)
        if ckpt.source.weights_sha256 != src.weights_sha256:
            raise CheckpointError(
                f"{src.checkpoint} changed since the model folder was exported (sha256 differs); re-export before benchmarking"
            )
        state = ckpt.state_dict
    hf_config, hf_state = to_hf_checkpoint(manifest.config, state)
    hf_state.pop("lm_head.weight")  # tied to wte; safetensors refuses shared tensors
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config))
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(folder / "model.safetensors"))


def hf_checkpoint(model_folder: Path, out: Path) -> Path:
    """The model folder's exact weights as a transformers GPT-2 folder that the peers' converters
    read (llama.cpp's convert_hf_to_gguf.py, CTranslate2's TransformersConverter): the reference
    checkpoint, plus `n_ctx` (llama.cpp's GPT-2 converter reads it; configs saved by transformers
    5 lack it) and the folder's tokenizer.json (both take the vocabulary from it). Returns `out`."""
    manifest = read_manifest(model_folder)
    write_hf_reference(manifest, out)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["n_ctx"] = config["n_positions"]
    config_file.write_text(json.dumps(config, indent=1))
    shutil.copyfile(Path(model_folder, manifest.tokenizer_file), out / "tokenizer.json")
    return out


def greedy_tokens(hf_folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt in fp32, EOS not stopping it."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar in the benchmark's log otherwise
    model = GPT2LMHeadModel.from_pretrained(hf_folder, attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()
