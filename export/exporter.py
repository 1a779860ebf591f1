"""The export pipeline: checkpoint -> ONNX graph -> check against PyTorch -> model folder.

Everything is written into a temporary sibling folder that is renamed into place only after
the check passes, so a failed or interrupted export never leaves a half folder behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnxruntime as ort

from gpt2onnx.engine.contract import DTYPES, MANIFEST_FILE, MODEL_FILE, Manifest, UserError, io_spec

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, random_checkpoint
from .graph import OPSET, EXTERNAL_DATA_THRESHOLD, build_module, export_graph
from .tokenizer_files import find_tokenizer, write_tokenizer
from .verify import check_export

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
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD  # lowered by tests to exercise external data

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if (self.model is None) == (self.random_init is None):
            raise ValueError("pass exactly one of --model SRC or --random-init SIZE")


def exporter_version() -> str:
    try:
        return version("gpt2-onnx")
    except PackageNotFoundError:
        return "unknown"


def export(cfg: ExportConfig) -> Manifest:
    """Export, check and write a model folder. Raises CheckpointError, OutputExistsError, ExportCheckError."""
    out = Path(cfg.output)
    if out.exists() and not cfg.force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise OutputExistsError(f"{out} exists and is not a gpt2-onnx model folder; refusing to replace it even with --force")

    ckpt: Checkpoint = random_checkpoint(cfg.random_init, cfg.seed) if cfg.random_init else load_checkpoint(cfg.model)
    if ckpt.source.random_init:
        log.warning("RANDOM weights (%s, seed %d): the model folder is labelled random-init and its text is meaningless", ckpt.source.checkpoint, cfg.seed)
    tokenizer_src = find_tokenizer(cfg.tokenizer, ckpt.folder, hub_fallback="gpt2")  # the family shares one

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_tokenizer(tokenizer_src, tmp, ckpt.config)
        reference = build_module(ckpt.config, ckpt.state_dict, "fp32")
        graph_module = reference if cfg.dtype == "fp32" else build_module(ckpt.config, {k: v.clone() for k, v in ckpt.state_dict.items()}, cfg.dtype)
        log.info("tracing %d-layer GPT-2 (%.1fM parameters) to ONNX in %s", ckpt.config.n_layer, ckpt.config.n_params / 1e6, cfg.dtype)
        external = export_graph(graph_module, cfg.dtype, tmp / MODEL_FILE, cfg.external_data_threshold, optimize=cfg.optimize)
        del graph_module
        session = ort.InferenceSession(str(tmp / MODEL_FILE), providers=["CPUExecutionProvider"])
        report = check_export(session, reference, cfg.dtype)
        log.info("export check passed: %s", report)
        manifest = Manifest(
            config=ckpt.config,
            dtype=cfg.dtype,
            source=ckpt.source,
            opset=OPSET,
            exporter_version=exporter_version(),
            io=io_spec(ckpt.config, cfg.dtype),
            external_data=external,
            optimized=cfg.optimize,
            check=dataclasses.asdict(report),
        )
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return manifest


def _replace(tmp: Path, out: Path) -> None:
    """Move tmp to out; an old folder is moved aside first and removed only after the rename."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)
