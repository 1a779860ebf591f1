"""Reading a model folder, and checking it before anything is built from it.

A folder can come from anywhere (a download, a colleague, a hostile user), so nothing in it is
trusted. `read_manifest` bounds manifest.json's size and depth and checks every field (type,
range, file names confined to the folder) before any list, buffer or session is sized from it.
At load, `check_graph` compares the graph's inputs and outputs with the manifest and
`check_tokenizer` the tokenizer with the config. Every failure is one ModelFolderError that
names the file or field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .contract import (
    DTYPES,
    INT8_KERNELS,
    KV_CACHES,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    GPT2Config,
    Manifest,
    ModelFolderError,
    Source,
    input_names,
    io_spec,
    output_names,
)  # fmt: skip
from .inputs import abbreviated

MAX_MANIFEST_BYTES = 1 << 20  # ours are about 10 KB; the io table grows with n_layer
MAX_DEPTH = 16  # ours nest 5 deep (io -> inputs -> name -> dims -> dim)
# Bounds well past any GPT-2 (xl: 48 layers, 25 heads, 1600 wide), low enough that nothing sized
# from them can take the machine down before the graph is checked against them.
CONFIG_INTS = {
    "n_layer": (1, 1024), "n_head": (1, 1024), "n_embd": (1, 65536),
    "n_positions": (1, 2**20), "vocab_size": (1, 2**20),
}  # fmt: skip
MAX_N_INNER = 4 * 65536
ACTIVATIONS = ("gelu_tanh", "gelu")
REEXPORT = "re-export the folder with `gpt2-onnx export`"
# Texts the tokenizer must encode to something and decode back unchanged (GPT-2's byte-level
# BPE always does; a tokenizer of another family, or a truncated vocabulary, does not).
PROBE_TEXTS = ("Hello, world! The year is 2026.", " naïve café, 日本語 🙂\n")
ORT_TYPES = {
    "float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)", "int32": "tensor(int32)",
}  # fmt: skip


class _Fields:
    """Typed reads from one JSON object of the manifest; a failure names the field's path."""

    def __init__(
        self, data: object, where: str, prefix: str, defaults: dict[str, object], fix: str = REEXPORT
    ):
        self.where, self.prefix, self.fix = where, prefix, fix
        if not isinstance(data, dict):
            self.fail(prefix.rstrip(".") or "the manifest", data, "a JSON object")
        unknown = sorted(set(data) - set(defaults))
        if unknown:
            raise ModelFolderError(
                f"{where}: unknown field {prefix}{unknown[0]}; it is not from this gpt2-onnx: {fix}"
            )
        self.data, self.defaults = data, defaults

    def fail(self, field: str, value: object, rule: str):
        raise ModelFolderError(
            f"{self.where}: {field} is {abbreviated(value)}, but it must be {rule}; {self.fix}"
        )

    def get(self, key: str) -> object:
        if key in self.data:
            return self.data[key]
        if self.defaults[key] is dataclasses.MISSING:
            raise ModelFolderError(f"{self.where}: {self.prefix}{key} is missing; {self.fix}")
        return self.defaults[key]

    def int(self, key: str, lo: int, hi: int, optional: bool = False) -> int | None:
        value = self.get(key)
        if value is None and optional:
            return None
        if type(value) is not int or not lo <= value <= hi:  # not bool, float or str
            self.fail(
                self.prefix + key, value, f"an integer in [{lo}, {hi}]" + (" or null" if optional else "")
            )
        return value

    def number(self, key: str, lo: float, hi: float) -> float:
        value = self.get(key)
        if type(value) not in (int, float) or not (math.isfinite(value) and lo < value < hi):
            self.fail(self.prefix + key, value, f"a number in ({lo}, {hi})")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self.get(key)
        if type(value) is not bool:
            self.fail(self.prefix + key, value, "true or false")
        return value

    def str(self, key: str, max_len: int = 4096, optional: bool = False) -> str | None:
        value = self.get(key)
        if value is None and optional:
            return None
        if type(value) is not str or not 0 < len(value) <= max_len:
            self.fail(self.prefix + key, value, f"a non-empty string of at most {max_len} characters")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key)
        if value not in choices or type(value) is not str:
            self.fail(self.prefix + key, value, "one of " + ", ".join(map(repr, choices)))
        return value

    def file_name(self, key: str, optional: bool = False) -> str | None:
        """A plain file name inside the folder: no separator, no '..', not absolute (the file
        itself may be a symlink)."""
        value = self.get(key)
        if value is None and optional:
            return None
        plain = type(value) is str and 0 < len(value) <= 255 and value not in (".", "..")
        if not plain or any(c in value for c in "/\\\0"):
            self.fail(
                self.prefix + key, value, "a plain file name inside the model folder (no '/', '\\' or '..')"
            )
        return value


def _defaults(cls) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def parse_config(data: object, where: str, prefix: str = "config.", fix: str = REEXPORT) -> GPT2Config:
    """GPT2Config from JSON, each field typed and bounded (also used for checkpoints' config.json)."""
    f = _Fields(data, where, prefix, _defaults(GPT2Config), fix)
    ints = {key: f.int(key, lo, hi) for key, (lo, hi) in CONFIG_INTS.items()}
    if ints["n_embd"] % ints["n_head"]:
        f.fail(f"{prefix}n_head", ints["n_head"], f"a divisor of {prefix}n_embd ({ints['n_embd']})")
    vocab = ints["vocab_size"]
    return GPT2Config(
        **ints,
        n_inner=f.int("n_inner", 1, MAX_N_INNER, optional=True),
        layer_norm_epsilon=f.number("layer_norm_epsilon", 0.0, 1.0),
        activation=f.choice("activation", ACTIVATIONS),
        scale_attn_by_inverse_layer_idx=f.bool("scale_attn_by_inverse_layer_idx"),
        bos_token_id=f.int("bos_token_id", 0, vocab - 1),
        eos_token_id=f.int("eos_token_id", 0, vocab - 1),
    )


def parse_source(data: object, where: str) -> Source:
    f = _Fields(data, where, "source.", _defaults(Source))
    sha = f.str("weights_sha256", 64, optional=True)
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        f.fail("source.weights_sha256", sha, "64 lowercase hex digits or null")
    return Source(
        checkpoint=f.str("checkpoint"),
        weights_sha256=sha,
        random_init=f.bool("random_init"),
        seed=f.int("seed", 0, 2**63 - 1, optional=True),
    )


def parse_manifest(data: object, where: str = MANIFEST_FILE) -> Manifest:
    """The one validation of a manifest's content: every field's type and range, file names
    confined to the folder, and the io table equal to the one the config implies."""
    if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
        raise ModelFolderError(
            f"{where}: schema_version {abbreviated(data.get('schema_version'))} is not supported (this gpt2-onnx "
            f"reads version {SCHEMA_VERSION}); re-export the model with this version of gpt2-onnx"
        )
    f = _Fields(data, where, "", _defaults(Manifest))
    config = parse_config(f.get("config"), where)
    dtype, kv_cache = f.choice("dtype", DTYPES), f.choice("kv_cache", KV_CACHES)
    optimized = f.bool("optimized")
    if kv_cache == "shared" and (not optimized or config.head_dim % 8):
        f.fail(
            "kv_cache", kv_cache, "'concat' for an unfused graph or a head size that is not a multiple of 8"
        )
    int8_kernel = f.get("int8_kernel")
    if int8_kernel is not None and (dtype != "int8" or int8_kernel not in INT8_KERNELS):
        f.fail(
            "int8_kernel",
            int8_kernel,
            "null, or for an int8 model one of " + ", ".join(map(repr, INT8_KERNELS)),
        )
    check = f.get("check")
    if check is not None and not isinstance(check, dict):
        f.fail("check", check, "a JSON object or null")
    manifest = Manifest(
        config=config,
        dtype=dtype,
        source=parse_source(f.get("source"), where),
        opset=f.int("opset", 1, 1000),
        exporter_version=f.str("exporter_version", 100),
        io=f.get("io"),
        model_file=f.file_name("model_file"),
        external_data=f.file_name("external_data", optional=True),
        tokenizer_file=f.file_name("tokenizer_file"),
        check=check,
        optimized=optimized,
        kv_cache=kv_cache,
        int8_kernel=int8_kernel,
        inspect_file=f.file_name("inspect_file", optional=True),
    )
    if manifest.inspect_file is not None and dtype not in ("fp32", "fp16"):
        f.fail(
            "inspect_file", manifest.inspect_file, "null for a quantized model (only fp32 and fp16 inspect)"
        )
    expected = io_spec(config, dtype, kv_cache)
    if manifest.io != expected:
        difference = _first_difference(manifest.io, expected)
        raise ModelFolderError(f"{where}: io is not what its config implies ({difference}); {REEXPORT}")
    return manifest


def _first_difference(got: object, want: dict) -> str:
    """Where an io table differs from the expected one, for the error message."""
    if not isinstance(got, dict):
        return abbreviated(got)
    for side in ("inputs", "outputs"):
        have = got.get(side)
        if not isinstance(have, dict):
            return f"{side}: {abbreviated(have)}"
        for name in [*want[side], *have]:
            if have.get(name) != want[side].get(name):
                return f"{side}.{name}: {abbreviated(have.get(name))}, expected {want[side].get(name)}"
    return f"extra keys {sorted(set(got) - set(want))}"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: object) -> int:
    """Nesting depth, counted level by level (no recursion, so any depth is safe to measure)."""
    depth, level = 0, [value]
    while level and depth <= MAX_DEPTH:
        depth += 1
        level = [
            v
            for x in level
            if isinstance(x, (dict, list))
            for v in (x.values() if isinstance(x, dict) else x)
        ]
    return depth


def read_json(path: Path, what: str = "a manifest", fix: str = REEXPORT) -> object:
    """A small JSON file, read with bounds: size, depth, and no NaN / Infinity."""
    too_deep = ModelFolderError(f"{path} is nested deeper than {what}'s {MAX_DEPTH} levels; {fix}")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ModelFolderError(f"{path} is {size} bytes, more than {what}'s {MAX_MANIFEST_BYTES}; {fix}")
        data = json.loads(path.read_bytes(), parse_constant=_reject_constant)
    except OSError as e:
        raise ModelFolderError(f"{path} cannot be read ({e.strerror}); check its permissions") from None
    except RecursionError:
        raise too_deep from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
        raise ModelFolderError(f"{path} is not valid JSON ({e}); {fix}") from None
    if _depth(data) > MAX_DEPTH:
        raise too_deep
    return data


def read_manifest(folder: str | Path) -> Manifest:
    """Read and validate `manifest.json` and check that its files are there. Raises
    ModelFolderError with the fix in its message."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ModelFolderError(f"{str(folder)!r} is a file; pass the model folder that holds {MANIFEST_FILE}")
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder {str(folder)!r} does not exist; export one with "
            f"`gpt2-onnx export --model gpt2 --output {folder}`"
        )
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ModelFolderError(
            f"{str(folder)!r} has no {MANIFEST_FILE}, so it is not a gpt2-onnx model folder; "
            "export one with `gpt2-onnx export --model SRC --output DIR`"
        )
    manifest = parse_manifest(read_json(path), str(path))
    for name in (manifest.model_file, manifest.external_data, manifest.tokenizer_file, manifest.inspect_file):
        if name and not (folder / name).is_file():
            raise ModelFolderError(f"{folder / name} is missing; the folder is incomplete, re-export it")
    return manifest


def check_graph(inputs: list, outputs: list, manifest: Manifest, path: Path) -> None:
    """The graph's inputs and outputs (onnxruntime's NodeArg lists) against the manifest: names in
    order, element types, and every static dim (n_head, head_dim, vocab); the manifest's named
    dims must be dynamic in the graph."""
    n_layer, kv = manifest.config.n_layer, manifest.kv_cache
    not_ours = f"the graph is not this folder's: {REEXPORT}"
    sides = (("input", inputs, input_names(n_layer, kv)), ("output", outputs, output_names(n_layer, kv)))
    for side, args, names in sides:
        got = [a.name for a in args]
        if got != names:
            i = next((i for i, (a, b) in enumerate(zip(got, names)) if a != b), min(len(got), len(names)))
            have = repr(got[i]) if i < len(got) else "nothing"
            want = repr(names[i]) if i < len(names) else "nothing"
            raise ModelFolderError(
                f"{path}: graph {side} {i} is {have} where the manifest has {want}; {not_ours}"
            )
        for arg in args:
            spec = manifest.io[f"{side}s"][arg.name]
            want_type = ORT_TYPES.get(spec["dtype"], spec["dtype"])
            if arg.type != want_type:
                raise ModelFolderError(
                    f"{path}: graph {side} {arg.name!r} is {arg.type} where the manifest has {want_type}; {not_ours}"
                )
            shape, dims = arg.shape if isinstance(arg.shape, list) else [], spec["dims"]
            static_match = [
                g == w if isinstance(w, int) else not isinstance(g, int) for g, w in zip(shape, dims)
            ]
            if len(shape) != len(dims) or not all(static_match):
                raise ModelFolderError(
                    f"{path}: graph {side} {arg.name!r} has shape {shape} where the manifest has {dims}; {not_ours}"
                )


def check_tokenizer(tokenizer, config: GPT2Config, path: Path) -> None:
    """The tokenizer against the config: every id inside the model's vocabulary, BOS and EOS among
    its tokens, and text that encodes to tokens and decodes back unchanged."""
    fix = "put the model's own tokenizer.json in the folder"
    top = tokenizer.max_token_id
    if top >= config.vocab_size:
        raise ModelFolderError(
            f"{path}: the tokenizer has token ids up to {top} but the model's vocabulary has {config.vocab_size}; {fix}"
        )
    for name in ("bos_token_id", "eos_token_id"):
        token_id = getattr(config, name)
        if tokenizer.id_to_token(token_id) is None:
            raise ModelFolderError(
                f"{path}: the manifest's {name} {token_id} is not a token of the tokenizer; {fix}"
            )
    for text in PROBE_TEXTS:
        ids = tokenizer.to_tokens(text, prepend_bos=False)
        if not ids or tokenizer.to_string(ids) != text:
            raise ModelFolderError(
                f"{path}: the tokenizer does not encode and decode text faithfully ({text!r} -> {ids[:8]}); "
                f"GPT-2 models need a byte-level BPE tokenizer: {fix}"
            )
