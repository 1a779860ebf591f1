"""The model folder contract shared by the exporter, the engine and the tests.

An exported folder describes itself: `manifest.json` holds the model dimensions, the dtype,
every graph input/output with its named dims, special token ids and where the weights came
from. The engine reads only this file and never branches on model names.

Graph inputs and outputs (one graph serves prefill and decode; past_seq may be 0):

    input_ids        int64   (batch, seq)
    position_ids     int64   (batch, seq)            caller-provided, so left padding works
    attention_mask   int64   (batch, total_seq)      1 = attend, 0 = padding; total_seq = past_seq + seq
    logits_to_keep   int64   ()                      1 <= n <= seq: logits for the last n positions
    past_key_{i}     float   (batch, n_head, past_seq, head_dim)    for each layer i
    past_value_{i}   float   (batch, n_head, past_seq, head_dim)
  ->
    logits           float   (batch, kept, vocab)    kept = logits_to_keep
    present_key_{i}  float   (batch, n_head, total_seq, head_dim)
    present_value_{i} float  (batch, n_head, total_seq, head_dim)

"float" is float16 for fp16 models and float32 otherwise (int8 models quantize weights only);
logits are always float32.

The shared cache (manifest kv_cache = "shared") is a fixed-size cache that the graph updates in
place (onnxruntime's GroupQueryAttention with past and present bound to one buffer). Rows are
left-aligned in the cache, each with its own length, so no padding is needed:

    input_ids              int64   (batch, seq)         a prompt batch is right-padded
    position_ids           int64   (batch, seq)
    seqlens_k              int32   (batch,)             tokens in each row's cache after this step, minus 1
    total_sequence_length  int32   ()                   the longest row's length after this step
    logits_index           int64   (batch, kept)        which positions of this step to return logits for
    past_key_{i}           float   (batch, n_head, max_seq, head_dim)   the whole buffer
    past_value_{i}         float   (batch, n_head, max_seq, head_dim)
  ->
    logits                 float32 (batch, kept, vocab)
    next_token             int64   (batch, kept)        argmax of logits: greedy decoding on the device,
                                                        so only the ids need to reach the host
    present_key_{i}        float   (batch, n_head, max_seq, head_dim)   the same buffer, updated
    present_value_{i}      float   (batch, n_head, max_seq, head_dim)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"

DTYPES = ("fp32", "fp16", "int8", "int4")
# int8's weight MatMuls: "rows" quantizes each activation row at run time (MatMulIntegerToFloat,
# per-column u8 weights: a step's cost per row falls with the batch); "blocks" keeps activations
# in float (MatMulNBits over 8-bit blocks: issue 25's figures, export/int8_rows.py)
INT8_KERNELS = ("rows", "blocks")
KV_CACHES = ("concat", "shared")  # past + new -> present (the contract above) | one buffer, updated in place
# Element type of the KV cache (and activations): int8 models quantize weights only.
ONNX_ELEM_TYPE = {"fp32": "float32", "fp16": "float16", "int8": "float32", "int4": "float32"}


class UserError(Exception):
    """Bad input from the user: the CLI prints the message as one line, without a traceback."""


class UsageError(UserError):
    """A bad command-line flag found after parsing; the message ends with the subcommand's --help."""


class InputError(UserError, ValueError):
    """A bad argument to a public method of the engine; the message names the argument, and
    `param` is its name (None where no one argument is at fault)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelFolderError(UserError, ValueError):
    """A model folder is missing, incomplete, inconsistent or of an unknown version; the message
    names the file or field, the value and the fix."""


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2 dimensions and the few architecture switches GPT-2 checkpoints use."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int = 1024
    vocab_size: int = 50257
    n_inner: int | None = None  # MLP width; None means 4 * n_embd, as in GPT-2
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_tanh"  # "gelu_tanh" (GPT-2's gelu_new) or "gelu" (erf)
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def n_params(self) -> int:
        """Parameter count with the tied wte / lm_head weight counted once."""
        C, F = self.n_embd, self.mlp_dim
        per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C)
        return self.vocab_size * C + self.n_positions * C + self.n_layer * per_layer + 2 * C


def past_names(n_layer: int) -> list[str]:
    """Graph input names of the KV cache, key then value for each layer."""
    return [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """Graph output names of the KV cache, in the same order as `past_names`."""
    return [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


STEP_INPUTS = {
    "concat": {
        "input_ids": ("int64", ["batch", "seq"]),
        "position_ids": ("int64", ["batch", "seq"]),
        "attention_mask": ("int64", ["batch", "total_seq"]),
        "logits_to_keep": ("int64", []),
    },
    "shared": {
        "input_ids": ("int64", ["batch", "seq"]),
        "position_ids": ("int64", ["batch", "seq"]),
        "seqlens_k": ("int32", ["batch"]),
        "total_sequence_length": ("int32", []),
        "logits_index": ("int64", ["batch", "kept"]),
    },
}
CACHE_DIMS = {
    "concat": ("past_seq", "total_seq"),
    "shared": ("max_seq", "max_seq"),
}  # (past, present) seq dim


def input_names(n_layer: int, kv_cache: str = "concat") -> list[str]:
    return [*STEP_INPUTS[kv_cache], *past_names(n_layer)]


def output_names(n_layer: int, kv_cache: str = "concat") -> list[str]:
    picked = ["next_token"] if kv_cache == "shared" else []
    return ["logits", *picked, *present_names(n_layer)]


def io_spec(config: GPT2Config, dtype: str, kv_cache: str = "concat") -> dict[str, dict[str, dict]]:
    """Every graph input/output with its element type and named dims (the manifest's `io`)."""
    kv = ONNX_ELEM_TYPE[dtype]
    nh, hd = config.n_head, config.head_dim
    past_dim, present_dim = CACHE_DIMS[kv_cache]
    inputs = {name: {"dtype": t, "dims": dims} for name, (t, dims) in STEP_INPUTS[kv_cache].items()}
    for name in past_names(config.n_layer):
        inputs[name] = {"dtype": kv, "dims": ["batch", nh, past_dim, hd]}
    outputs = {"logits": {"dtype": "float32", "dims": ["batch", "kept", config.vocab_size]}}
    if kv_cache == "shared":
        outputs["next_token"] = {"dtype": "int64", "dims": ["batch", "kept"]}
    for name in present_names(config.n_layer):
        outputs[name] = {"dtype": kv, "dims": ["batch", nh, present_dim, hd]}
    return {"inputs": inputs, "outputs": outputs}


@dataclass(frozen=True)
class Source:
    """Where the weights came from."""

    checkpoint: str  # a folder path, a hub id, or "random-init:<size>"
    weights_sha256: str | None  # sha256 of the weights file(s); None for random init
    random_init: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class Manifest:
    config: GPT2Config
    dtype: str
    source: Source
    opset: int
    exporter_version: str
    io: dict = field(default_factory=dict)
    model_file: str = MODEL_FILE
    external_data: str | None = None
    tokenizer_file: str = TOKENIZER_FILE
    check: dict | None = None  # the export-time comparison with PyTorch
    optimized: bool = False  # fused attention / LayerNorm / GELU (onnxruntime contrib ops)
    kv_cache: str = "concat"  # see KV_CACHES
    int8_kernel: str | None = None  # int8 only: see INT8_KERNELS (absent in folders before it)
    inspect_file: str | None = None  # the inspection graph (export --inspect), for Engine.run_with_cache
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"
