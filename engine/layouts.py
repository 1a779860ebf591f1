"""Which session serves a model folder: the cache layout from its manifest, and on the GPU the
in-place cache's static decode (CUDA graphs). Its own module so that session.py and
static_session.py (which builds on it) do not import each other."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from . import session  # by module: tests fake session.cuda_device_count
from .contract import Manifest
from .session import ConcatCacheSession, ModelSession, ProviderError, SessionConfig, SharedCacheSession
from .static_session import StaticCacheSession

log = logging.getLogger(__name__)


def open_session(folder: Path, manifest: Manifest, config: SessionConfig) -> ModelSession:
    """The session class for the folder's cache layout; on the GPU, the in-place cache's decode
    steps are static and captured as CUDA graphs (static_session.py) unless static_decode=False.
    Raises ProviderError for provider="cuda" with an in-place cache the GPU cannot run (see below)."""
    on_gpu = config.provider == "cuda" or (config.provider == "auto" and session.cuda_device_count() > 0)
    if manifest.kv_cache != "shared":
        if config.static_decode:
            raise ValueError(
                "static decode (CUDA graphs) needs the in-place cache: export with --kv-cache shared"
            )
        return ConcatCacheSession(folder, manifest, config)
    if on_gpu and manifest.dtype not in GQA_CUDA_DTYPES:
        config = cpu_for_gqa(manifest.dtype, config)
        on_gpu = False
    static = on_gpu if config.static_decode is None else config.static_decode
    return (StaticCacheSession if static else SharedCacheSession)(folder, manifest, config)


GQA_CUDA_DTYPES = ("fp16",)  # onnxruntime's GroupQueryAttention has CUDA kernels for fp16 (and bf16) only


def cpu_for_gqa(dtype: str, config: SessionConfig) -> SessionConfig:
    """An in-place-cache model in another dtype would run its attention on the CPU with the cache
    copied between devices at every step, and could never be captured as a CUDA graph: refused when
    the GPU was asked for by name, run on the CPU provider otherwise."""
    why = (f"onnxruntime's GroupQueryAttention runs on CUDA in fp16 only, so this {dtype} model's in-place cache "
           "cannot use the GPU")  # fmt: skip
    fix = "export it with --dtype fp16 --kv-cache shared for the GPU"
    if config.provider == "cuda":
        raise ProviderError(f"{why}: {fix}, or use --provider cpu")
    log.warning("running on the CPU: %s (%s)", why, fix)
    return dataclasses.replace(config, provider="cpu")
