"""Which device runs the model, decided once, and the one place onnxruntime sessions are created.

onnxruntime-gpu lists the CUDA provider even on a machine without a GPU, and its Python session
falls back to the CPU on its own when the provider fails unless told not to (every session here
is), so the device is resolved here, before any session:
the NVIDIA driver is asked whether a GPU is there, the CUDA libraries are loaded (cuda_libs.py),
and a session that came back on the CPU anyway is either refused (the GPU was asked for by name)
or reported once.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf, NoSuchFile

from . import cuda_libs
from .contract import Manifest, ModelFolderError, UserError

log = logging.getLogger(__name__)

GQA_CUDA_DTYPES = ("fp16",)  # onnxruntime's GroupQueryAttention has CUDA kernels for fp16 (and bf16) only

# what onnxruntime raises for a model file it cannot read, whichever provider was asked for
MODEL_ERRORS = (InvalidGraph, InvalidProtobuf, NoSuchFile)


class ProviderError(UserError, RuntimeError):
    pass


def cuda_device_count() -> int:
    """GPUs the NVIDIA driver sees (0 without a driver)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def resolve_device(provider: str, manifest: Manifest | None = None) -> str:
    """ "cuda" or "cpu" for a requested provider ("auto" | "cuda" | "cpu") and, when given, the
    model folder's manifest: auto is the GPU when the driver sees one and the CUDA libraries load.
    Raises ProviderError when "cuda" cannot be had."""
    if provider == "cpu":
        return "cpu"
    if manifest is not None and manifest.kv_cache == "shared" and manifest.dtype not in GQA_CUDA_DTYPES:
        return cpu_for_gqa(manifest.dtype, provider)  # before any CUDA library is loaded
    if cuda_device_count() == 0:
        if provider == "cuda":
            raise ProviderError(
                "--provider cuda was requested but no NVIDIA GPU is visible to the driver; "
                "use --provider cpu (or auto)"
            )
        return "cpu"
    return "cuda" if load_cuda_libraries(provider) else "cpu"


def cpu_for_gqa(dtype: str, provider: str) -> str:
    """A shared-cache model in another dtype would run its attention on the CPU with the cache
    copied between devices at every step, and could never be captured as a CUDA graph: refused when
    the GPU was asked for by name, run on the CPU provider otherwise (warned when there is a GPU)."""
    why = (f"onnxruntime's GroupQueryAttention runs on CUDA in fp16 only, so this {dtype} model's shared cache "
           "cannot use the GPU")  # fmt: skip
    fix = "export it with --dtype fp16 --kv-cache shared for the GPU"
    if provider == "cuda":
        raise ProviderError(f"{why}: {fix}, or use --provider cpu")
    if cuda_device_count() > 0:
        log.warning("running on the CPU: %s (%s)", why, fix)
    return "cpu"


def load_cuda_libraries(provider: str) -> bool:
    """Load the CUDA and cuDNN libraries from wherever the nvidia packages are (cuda_libs.py), before
    the CUDA provider looks for them. False, with a warning, when one is missing and provider is
    "auto" (the caller then runs on the CPU); ProviderError naming it when provider is "cuda"."""
    missing = cuda_libs.preload(cuda_libs.cuda_major(getattr(ort, "cuda_version", None)))
    if not missing:
        return True
    what = cuda_libs.describe(missing)
    fix = (
        "install torch's CUDA packages (nvidia-cublas, nvidia-cuda-runtime, nvidia-curand, nvidia-cudnn-cu13)"
    )
    if provider == "cuda":
        raise ProviderError(f"the CUDA execution provider cannot start: {what}; {fix} or use --provider cpu")
    log.warning("a GPU is present but the CUDA execution provider cannot start (%s); running on the CPU: %s",
                what, fix)  # fmt: skip
    return False


def create_session(
    model: Path | bytes,
    device: str,
    threads: int | None,
    cuda_graphs: bool = False,
    strict: bool = False,
    spinning: bool = True,
    external_data: Path | None = None,
    memory_files: dict[str, np.ndarray] | None = None,
) -> tuple[ort.InferenceSession, bool]:
    """An onnxruntime session of `model` (a model file, or a serialized model such as the sampling
    graph; `external_data`: the model file whose folder holds its external data; `memory_files`:
    external data files held in memory, by the name the graph uses) on a resolved `device`.
    cuda_graphs asks the CUDA provider to capture runs as CUDA graphs.
    Returns (session, whether graphs are on); `device_of(session)` says where it really runs. A CUDA
    session that fell back to the CPU raises ProviderError when `strict` (the GPU was asked for by
    name) and is logged otherwise."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's own log lines (warnings about shape ops placed on the CPU, a failed kernel's
    # error, which also comes back as the exception we report) only with --debug.
    options.log_severity_level = 2 if log.isEnabledFor(logging.DEBUG) else 4
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:  # two sessions take turns on the cores (a draft model): idle threads must sleep
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"} if cuda_graphs else {})
        providers = [cuda, "CPUExecutionProvider"]
    source = model if isinstance(model, bytes) else str(model)
    what = model if isinstance(model, Path) else external_data or "an in-memory graph"
    if isinstance(model, bytes) and external_data is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_data.parent)
        )
    if memory_files:
        names, buffers = list(memory_files), list(memory_files.values())
        options.add_external_initializers_from_files_in_memory(names, buffers, [b.nbytes for b in buffers])
    try:
        # enable_fallback=0: onnxruntime's Python session would otherwise answer a provider failure
        # (at creation, or in any later run) by printing "EP Error" banners to stdout and switching
        # itself to the CPU, after which our IO binding belongs to a session that no longer exists.
        session = ort.InferenceSession(source, options, providers=providers, enable_fallback=0)
    except MODEL_ERRORS as e:
        raise ModelFolderError(
            f"{what} could not be loaded by onnxruntime ({first_line(e)}); re-export the model folder"
        ) from e
    except Exception as e:  # onnxruntime raises its own untyped errors for everything else
        if device == "cuda" and cuda_graphs:
            # Capture needs every compute node on the CUDA provider; run without graphs rather than fail.
            log.warning("CUDA graphs are off: onnxruntime cannot capture this graph (%s)", first_line(e))
            again = create_session(model, device, threads, strict=strict, external_data=external_data,
                                   memory_files=memory_files)  # fmt: skip
            return again[0], False
        if device == "cuda":
            raise ProviderError(
                f"the CUDA execution provider could not run {what} ({first_line(e)}); "
                "use --provider cpu, or --debug for onnxruntime's own log"
            ) from e
        raise ModelFolderError(
            f"{what} could not be loaded by onnxruntime ({first_line(e)}); re-export the model folder"
        ) from e
    got = device_of(session)
    if device == "cuda" and got != "cuda":
        why = "the CUDA libraries were found; --debug shows onnxruntime's own error"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            why = f"onnxruntime {ort.__version__} here has no CUDA provider: install onnxruntime-gpu"
        if strict:
            raise ProviderError(f"the CUDA execution provider failed to start ({why}); use --provider cpu")
        log.warning("a GPU is present but the CUDA execution provider failed to start (%s); "
                    "running on the CPU", why)  # fmt: skip
    graphs = cuda_graphs and got == "cuda"
    log.info("running on %s (%s)%s", got.upper(), session.get_providers()[0], " with CUDA graphs" * graphs)
    return session, graphs


def device_of(session: ort.InferenceSession) -> str:
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def first_line(error: BaseException) -> str:
    """An exception's first line, short enough for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
