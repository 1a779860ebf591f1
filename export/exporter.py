"""The export pipeline: checkpoint -> ONNX graph -> check against PyTorch -> model folder.

Everything is written into a temporary sibling folder that is moved into place only after the
check passes (engine/atomic_folder.py), so a failed, interrupted or killed export never leaves a
half folder at --output, and the next export into the same parent clears what a killed one left.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from gpt2onnx.engine import atomic_folder
from gpt2onnx.engine.contract import (
    DTYPES,
    INT8_KERNELS,
    KV_CACHES,
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    UserError,
    io_spec,
)
from gpt2onnx.engine.runtime import create_session
from gpt2onnx.engine.session import Session, SessionConfig

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, random_checkpoint
from .dequantize import dequantized_weights
from .graph import EXTERNAL_DATA_THRESHOLD, OPSET, build_module, export_graph
from .inspect import INSPECT_DTYPES, INSPECT_FILE, check_inspect, expected_activations, write_inspect
from .memory import release_memory
from .quantize import QUANTIZED, check_quantizer_available
from .tokenizer_files import find_tokenizer, write_tokenizer
from .verify import (
    STORED,
    Case,
    CheckReport,
    check_and_load_stored_weights,
    check_export,
    check_shared_export,
    expected_outputs,
)

log = logging.getLogger(__name__)


class OutputExistsError(UserError, FileExistsError):
    pass


@dataclass(frozen=True)
class ExportConfig:
    output: Path
    model: str | None = None  # a Hugging Face folder or hub id; None with random_init
    random_init: str | None = None  # a size name: the real shape with seeded random weights
    seed: int = 0
    dtype: str = "fp32"
    tokenizer: Path | None = None
    force: bool = False
    optimize: bool = True  # fused attention, SkipLayerNormalization and FastGelu (export/fusion.py)
    kv_cache: str = "concat"  # "shared": a fixed-size cache updated in place
    int8_kernel: str = "rows"  # int8's MatMuls (INT8_KERNELS): per-row activations, or MatMulNBits blocks
    inspect: bool = False  # also write the inspection graph (export/inspect.py): Engine.run_with_cache
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD  # lowered by tests to exercise external data

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(
                f"--kv-cache {self.kv_cache!r} is not supported; choose one of {', '.join(KV_CACHES)}"
            )
        if self.kv_cache == "shared" and not self.optimize:
            raise ValueError(
                "--kv-cache shared needs the fused graph (GroupQueryAttention); drop --no-optimize"
            )
        if self.int8_kernel not in INT8_KERNELS:
            raise ValueError(
                f"--int8-kernel {self.int8_kernel!r} is not supported; choose one of {', '.join(INT8_KERNELS)}"
            )
        if self.inspect and self.dtype not in INSPECT_DTYPES:
            raise ValueError(
                f"--inspect needs float weights (--dtype {' or '.join(INSPECT_DTYPES)}); this export is "
                f"{self.dtype}: drop --inspect, or export an inspectable folder with --dtype fp32 --inspect"
            )
        if (self.model is None) == (self.random_init is None):
            raise ValueError("pass exactly one of --model SRC or --random-init SIZE")
        if type(self.seed) is not int or not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be an integer in [0, 2**63), got {self.seed!r}")


def exporter_version() -> str:
    try:
        return version("gpt2-onnx")
    except PackageNotFoundError:
        return "unknown"


def export(cfg: ExportConfig) -> Manifest:
    """Export, check and write a model folder. Raises CheckpointError, OutputExistsError, ExportCheckError."""
    out = Path(cfg.output)
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputExistsError(
            f"{parent} is a file, so --output {out} cannot be made; pass a path in a folder"
        )
    atomic_folder.sweep(out.parent)  # first: puts back an --output a killed `export --force` left aside
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise OutputExistsError(f"{out} is {kind}, not a model folder; pass a folder path as --output")
    if out.exists() and not cfg.force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise OutputExistsError(
            f"{out} exists and is not a gpt2-onnx model folder; refusing to replace it even with --force"
        )

    if cfg.dtype in QUANTIZED:
        check_quantizer_available(cfg.dtype)  # a missing onnx_ir fails now, not after tracing
    ckpt: Checkpoint = (
        random_checkpoint(cfg.random_init, cfg.seed) if cfg.random_init else load_checkpoint(cfg.model)
    )
    if ckpt.source.random_init:
        log.warning(
            "RANDOM weights (%s, seed %d): the model folder is labelled random-init and its text is meaningless",
            ckpt.source.checkpoint,
            cfg.seed,
        )
    if cfg.kv_cache == "shared" and ckpt.config.head_dim % 8:
        raise CheckpointError(
            f"--kv-cache shared needs a head size that is a multiple of 8 (GroupQueryAttention); this model's is {ckpt.config.head_dim}: use --kv-cache concat"
        )
    release_memory()  # what loading left behind, before tracing adds its own
    tokenizer_src = find_tokenizer(cfg.tokenizer, ckpt.folder, hub_fallback="gpt2")  # the family shares one

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = atomic_folder.partial_folder(out)
        write_tokenizer(tokenizer_src, tmp, ckpt.config)
        external, expected = _write_graph(cfg, ckpt, tmp / MODEL_FILE)
        ckpt = dataclasses.replace(ckpt, state_dict={})  # the weights' last owner
        release_memory()
        atomic_folder.fault_point("weights-written")
        manifest = Manifest(
            config=ckpt.config,
            dtype=cfg.dtype,
            source=ckpt.source,
            opset=OPSET,
            exporter_version=exporter_version(),
            io=io_spec(ckpt.config, cfg.dtype, cfg.kv_cache),
            external_data=external,
            optimized=cfg.optimize,  # __post_init__ refuses the shared cache without it
            kv_cache=cfg.kv_cache,
            int8_kernel=cfg.int8_kernel if cfg.dtype == "int8" else None,
            inspect_file=INSPECT_FILE if cfg.inspect else None,
        )
        report = _check(tmp, manifest, expected)
        log.info("export check passed: %s", report)
        atomic_folder.fault_point("checked")
        manifest = dataclasses.replace(manifest, check=dataclasses.asdict(report))
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        atomic_folder.fault_point("manifest-written")
        atomic_folder.seal(tmp)
        atomic_folder.replace(tmp, out)
    except BaseException:
        if tmp is not None:
            _remove_partial(tmp)
        raise
    log.info("wrote %s", out)
    return manifest


@dataclass
class Expected:
    """What the written graph must compute (export/verify.py): the reference's outputs with the
    checkpoint's weights and, for a quantized graph, with the weights it stores (dequantized),
    and how far those stored weights are from the checkpoint's, in quantization steps."""

    cases: list[Case]
    stored: list[Case] | None = None
    weight_steps: float | None = None
    activations: list | None = None  # the inspection graph's cases (inspect.expected_activations)


def _write_graph(cfg: ExportConfig, ckpt: Checkpoint, path: Path) -> tuple[str | None, Expected]:
    """Trace, write and read back the graph, then run the PyTorch reference on the check's cases.
    Every copy of the weights made here is gone when it returns, so the check's onnxruntime
    session is the only one in memory when it runs (with the caller's checkpoint let go)."""
    reference = build_module(ckpt.config, ckpt.state_dict, "fp32")
    # the same tensors (fp16: converted copies); tracing leaves the module as it came
    graph_module = reference if cfg.dtype == "fp32" else build_module(ckpt.config, ckpt.state_dict, cfg.dtype)
    log.info("tracing %d-layer GPT-2 (%.1fM parameters) to ONNX in %s",
             ckpt.config.n_layer, ckpt.config.n_params / 1e6, cfg.dtype)  # fmt: skip
    external, graph, weights = export_graph(
        graph_module,
        cfg.dtype,
        path,
        cfg.external_data_threshold,
        optimize=cfg.optimize,
        kv_cache=cfg.kv_cache,
        int8_kernel=cfg.int8_kernel,
    )
    if cfg.inspect:
        log.info("tracing the inspection graph (every activation under TransformerLens's names)")
        write_inspect(graph_module, path.parent / INSPECT_FILE, graph, weights)
    del graph_module  # fp16: `weights` holds its tensors until the stored weights are checked
    log.info("running the PyTorch reference on the check's inputs")
    expected = Expected(expected_outputs(reference, cfg.dtype, cfg.kv_cache))
    if cfg.inspect:
        expected.activations = expected_activations(reference)
    if cfg.dtype in QUANTIZED:
        log.info("checking the quantized weights against the checkpoint's")
        expected.weight_steps = check_and_load_stored_weights(reference, dequantized_weights(graph, weights))
        expected.stored = expected_outputs(reference, cfg.dtype, cfg.kv_cache)
    return external, expected


def _check(folder: Path, manifest: Manifest, expected: Expected) -> CheckReport:
    """The written graph against the reference's outputs on the CPU: directly for the concat
    cache; through the engine's own session for the shared cache, whose steps only make sense in
    sequence. A quantized graph is judged against the checkpoint's outputs (QUANTIZED_BOUNDS) and,
    closely, against those of the weights it stores (STORED)."""
    if manifest.kv_cache == "shared":
        config = SessionConfig(provider="cpu", max_batch=4, max_seq=min(64, manifest.config.n_positions))
        session, check = Session(folder, manifest, config), check_shared_export
    else:
        session, check = create_session(folder / MODEL_FILE, "cpu", None)[0], check_export
    report = check(session, expected.cases, manifest.dtype)
    if expected.stored is not None:
        log.info("checking the quantized graph against the weights it stores")
        stored = check(session, expected.stored, manifest.dtype, tol=STORED)
        report = dataclasses.replace(
            report,
            weight_steps=expected.weight_steps,
            stored_rel_logits=stored.rel_logits,
            stored_rel_present=stored.rel_present,
        )
    if expected.activations is not None:
        del session  # one graph's weights in memory at a time
        log.info("checking the inspection graph against PyTorch")
        session = create_session(folder / manifest.inspect_file, "cpu", None)[0]
        report = dataclasses.replace(
            report, inspect_rel=check_inspect(session, expected.activations, manifest.dtype)
        )
    return report


def _remove_partial(tmp: Path) -> None:
    """The temp folder of a failed export, unless it was already moved into place. Called while an
    error propagates, so a failure here is logged, not raised over it."""
    if not os.path.lexists(tmp):
        return
    try:
        atomic_folder.discard(tmp)
    except OSError as e:
        log.warning("could not remove %s (%s); the next export into %s removes it", tmp, e, tmp.parent)
