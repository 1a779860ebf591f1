"""Reading GPT-2 checkpoints: a Hugging Face folder, a hub id, or seeded random weights.

Everything here returns a GPT2Config and a state dict in *our* module's names
(see export/model.py), so the rest of the exporter never looks at checkpoint formats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2onnx.engine.contract import GPT2Config, ModelFolderError, Source, UserError
from gpt2onnx.engine.model_folder import parse_config, read_json

log = logging.getLogger(__name__)

# The GPT-2 family in one table: hub id -> dimensions (all share vocab 50257, 1024 positions).
SIZES: dict[str, dict[str, int]] = {
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
SIZE_ALIASES = {
    "124m": "gpt2",
    "small": "gpt2",
    "medium": "gpt2-medium",
    "large": "gpt2-large",
    "xl": "gpt2-xl",
}

# Hugging Face activation names -> ours.
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)  # in order of preference
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class CheckpointError(UserError, ValueError):
    """The checkpoint cannot be read; the message says why and what to do."""


@dataclass
class Checkpoint:
    config: GPT2Config
    state_dict: dict[str, torch.Tensor]  # our module's names
    source: Source
    folder: Path | None  # where tokenizer files may be found


def canonical_size(size: str) -> str:
    name = SIZE_ALIASES.get(size.lower(), size.lower())
    if name not in SIZES:
        raise CheckpointError(f"unknown size {size!r}; choose one of {', '.join([*SIZES, *SIZE_ALIASES])}")
    return name


def load_checkpoint(model: str) -> Checkpoint:
    """Load a local Hugging Face GPT-2 folder, or a hub id through huggingface_hub's cache."""
    path = Path(model).expanduser()
    if path.exists():
        folder, label = path, str(path.resolve())
    elif _looks_like_path(model):
        raise CheckpointError(
            f"model folder {model!r} does not exist; pass an existing folder or a hub id such as gpt2"
        )
    else:
        folder, label = download(model), model
    if not folder.is_dir():
        raise CheckpointError(f"{model!r} is a file; pass the folder that holds config.json and the weights")
    config = read_hf_config(folder)
    weights = _weight_files(folder)
    log.debug("reading weights from %s", ", ".join(str(w) for w in weights))
    hf_state = _read_weights(weights)
    state = convert_hf_state_dict(hf_state, config)
    source = Source(checkpoint=label, weights_sha256=_sha256(weights))
    return Checkpoint(config, state, source, folder)


def random_checkpoint(size: str, seed: int) -> Checkpoint:
    """The real shape of a named size with GPT-2's initialisation, seeded (for benchmarks and offline runs)."""
    name = canonical_size(size)
    config = GPT2Config(**SIZES[name])
    source = Source(checkpoint=f"random-init:{name}", weights_sha256=None, random_init=True, seed=seed)
    return Checkpoint(config, random_state_dict(config, seed), source, None)


def param_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every weight of our module with its shape; the one list that loading and random init share."""
    C, F = config.n_embd, config.mlp_dim
    shapes = {"wte_t": (C, config.vocab_size), "wpe": (config.n_positions, C)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (C, F), p + "mlp.c_fc.bias": (F,),
            p + "mlp.c_proj.weight": (F, C), p + "mlp.c_proj.bias": (C,),
        }  # fmt: skip
    return shapes | {"ln_f.weight": (C,), "ln_f.bias": (C,)}


def to_hf_checkpoint(
    config: GPT2Config, state: dict[str, torch.Tensor]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our names -> a Hugging Face GPT2LMHeadModel (config dict, state dict): the inverse of loading,
    so baselines can run the very weights a model folder was exported from."""
    hf_state = {
        ("transformer." + k if k != "wte_t" else "transformer.wte.weight"): v for k, v in state.items()
    }
    hf_state["transformer.wte.weight"] = state["wte_t"].t().contiguous()
    hf_state["transformer.wpe.weight"] = hf_state.pop("transformer.wpe")
    hf_state["lm_head.weight"] = hf_state["transformer.wte.weight"]
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[config.activation]
    hf_config = dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
        n_positions=config.n_positions, vocab_size=config.vocab_size, n_inner=config.n_inner, layer_norm_epsilon=config.layer_norm_epsilon,
        activation_function=activation, scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    return hf_config, hf_state


def random_state_dict(config: GPT2Config, seed: int) -> dict[str, torch.Tensor]:
    """GPT-2's init: N(0, 0.02) weights, residual projections N(0, 0.02/sqrt(2 n_layer)),
    wpe N(0, 0.01), zero biases, unit LayerNorm gains."""
    g = torch.Generator().manual_seed(seed)
    proj_std = 0.02 / math.sqrt(2 * config.n_layer)
    state = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            state[name] = torch.ones(shape)
        elif name.endswith("bias"):
            state[name] = torch.zeros(shape)
        else:
            std = proj_std if name.endswith("c_proj.weight") else 0.01 if name == "wpe" else 0.02
            state[name] = torch.randn(shape, generator=g) * std
    return state


def read_hf_config(folder: Path) -> GPT2Config:
    """config.json of a Hugging Face GPT-2 checkpoint, read with the manifest's bounds and checks
    (a hostile config cannot size anything before it is checked)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no config.json; pass a Hugging Face GPT-2 model folder (config.json + model.safetensors or pytorch_model.bin)"
        )
    fix = "fix config.json or pass a Hugging Face GPT-2 checkpoint"
    try:
        hf = read_json(path, "a config.json", fix)
        if not isinstance(hf, dict):
            raise ModelFolderError(f"{path} is not a JSON object; {fix}")
        model_type = hf.get("model_type")
        if model_type != "gpt2":
            raise CheckpointError(
                f"{path} describes model_type {model_type!r}, not 'gpt2'; gpt2-onnx exports GPT-2 family checkpoints only"
            )
        if hf.get("reorder_and_upcast_attn") or hf.get("add_cross_attention"):
            raise CheckpointError(f"{path}: reorder_and_upcast_attn / add_cross_attention are not supported")
        if hf.get("scale_attn_weights") is False:
            raise CheckpointError(f"{path}: scale_attn_weights=false is not supported")
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise CheckpointError(
                f"{path}: activation_function {act!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
            )
        fields = {
            key: hf[key]
            for key in (
                "n_layer",
                "n_head",
                "n_embd",
                "vocab_size",
                "n_inner",
                "layer_norm_epsilon",
                "scale_attn_by_inverse_layer_idx",
            )
            if key in hf
        }
        fields |= dict(
            n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
            activation=ACTIVATIONS[act],
            bos_token_id=_first(hf.get("bos_token_id"), 50256),
            eos_token_id=_first(hf.get("eos_token_id"), 50256),
        )
        return parse_config(fields, str(path), prefix="", fix=fix)
    except ModelFolderError as e:
        raise CheckpointError(str(e)) from None


def _first(value, default):
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else value


def convert_hf_state_dict(hf: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    """Hugging Face GPT2LMHeadModel / GPT2Model names -> ours, checking names and shapes."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # mask buffers
    lm_head = hf.pop("lm_head.weight", None)
    if "wte.weight" not in hf:
        raise CheckpointError("the weights have no wte.weight (token embedding); is this a GPT-2 checkpoint?")
    wte = hf.pop("wte.weight")
    if lm_head is not None and not (lm_head.shape == wte.shape and torch.equal(lm_head, wte)):
        raise CheckpointError(
            "lm_head.weight differs from wte.weight; only GPT-2's tied embedding is supported"
        )
    state = {"wte_t": wte.t().contiguous(), "wpe": hf.pop("wpe.weight", None)}
    state |= hf
    expected = param_shapes(config)
    missing = sorted(set(expected) - {k for k, v in state.items() if v is not None})
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "the weights do not match config.json: "
            + (f"missing {missing[:4]}{'...' if len(missing) > 4 else ''} " if missing else "")
            + (f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}" if unexpected else "")
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"weight {k} has shape {tuple(state[k].shape)} but config.json implies {shape}"
            )
        state[k] = state[k].float()
    return state


def _weight_files(folder: Path) -> list[Path]:
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid shard index ({e})") from e
        return [folder / s for s in shards]
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(
        f"{folder} has no weights: expected model.safetensors or pytorch_model.bin beside config.json"
    )


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weights file {f} is missing; re-download the checkpoint")
        try:
            if f.suffix == ".safetensors":
                state |= load_file(f)
            else:
                state |= torch.load(f, map_location="cpu", weights_only=True)
        except (
            SafetensorError,
            OSError,
            RuntimeError,
            EOFError,
            ValueError,
            KeyError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
        ) as e:
            # torch.load raises a zoo of exception types on damaged files; all mean the same to a user.
            raise CheckpointError(
                f"weights file {f} is corrupt or unreadable ({e.__class__.__name__}); re-download or re-save the checkpoint"
            ) from e
    return state


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _looks_like_path(model: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a mistyped folder."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def download(repo_id: str) -> Path:
    """Fetch config, weights and tokenizer files of a hub model into huggingface_hub's cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    log.info("fetching %s from the Hugging Face hub (cached after the first time)", repo_id)
    safetensors = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
    try:
        folder = Path(
            snapshot_download(repo_id, allow_patterns=["config.json", *safetensors, *TOKENIZER_FILES])
        )
        if not any((folder / name).is_file() for name in WEIGHT_FILES):  # an older repo: .bin only
            folder = Path(snapshot_download(repo_id, allow_patterns=["pytorch_model.bin"]))
        return folder
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{repo_id!r} is neither a local folder nor a model on the Hugging Face hub"
        ) from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face hub (offline?); download it elsewhere "
            f"and pass its local folder instead: --model /path/to/{repo_id.split('/')[-1]} "
            f"(a folder with config.json and model.safetensors)"
        ) from e
