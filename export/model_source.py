"""Where a command's model folder comes from: a folder as given, or the export of a checkpoint
(a hub id, a Hugging Face folder, `--random-init SIZE`) into a models folder, made on first use
and reused after. Shared by `generate`, `serve` and `bench`; in the exporter's package, as it exports."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from gpt2onnx.engine import atomic_folder
from gpt2onnx.engine.contract import MANIFEST_FILE
from gpt2onnx.engine.extras import needs_extra

log = logging.getLogger("gpt2onnx")


def resolve_model(
    model: str | None,
    random_init: str | None = None,
    seed: int = 0,
    dtype: str = "fp32",
    tokenizer: str | None = None,
    models_dir: str = "models",
    kv_cache: str = "concat",
) -> Path:
    """A model folder as given, or the export of `model` / `random_init` in models_dir (made once, reused after)."""
    if model:
        atomic_folder.recover(Path(model))  # an `export --force` killed mid-swap left the old folder aside
    if model and os.path.lexists(Path(model) / MANIFEST_FILE):  # a model folder (read_manifest judges it)
        return Path(model)
    if random_init:
        name = f"random-{random_init}-seed{seed}"
    elif Path(model).exists():
        path = Path(model).resolve()
        name = f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    else:
        name = model.replace("/", "--")
    folder = Path(models_dir) / f"{name}-{dtype}{'-shared' if kv_cache == 'shared' else ''}"
    atomic_folder.recover(folder)
    if (folder / MANIFEST_FILE).is_file():
        log.info("using %s (exported earlier)", folder)
        return folder
    with needs_extra("export", "exporting a model on first use"):  # torch: imported only to export
        from .exporter import ExportConfig, export

    log.info("exporting %s into %s (once)", model or f"random-init {random_init}", folder)
    export(
        ExportConfig(
            output=folder,
            model=model,
            random_init=random_init,
            seed=seed,
            dtype=dtype,
            tokenizer=Path(tokenizer) if tokenizer else None,
            kv_cache=kv_cache,
        )
    )
    return folder
