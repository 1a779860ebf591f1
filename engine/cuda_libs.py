"""Finding the CUDA and cuDNN libraries onnxruntime's CUDA provider needs, and loading them first.

The provider library (libonnxruntime_providers_cuda.so) links cudart, cuBLASLt, cuBLAS and cuRAND by
soname and opens cuDNN (and cuFFT, NVRTC) with dlopen on first use. NVIDIA ships these as Python
packages under an `nvidia` folder: nvidia/cu13/lib and nvidia/cudnn/lib for CUDA 13, one folder per
library (nvidia/cublas/lib, nvidia/cuda_runtime/lib, ...) before. They usually come with torch, in
its site-packages. onnxruntime.preload_dlls() looks only beside the onnxruntime package, so with
onnxruntime-gpu installed elsewhere (`pip install --target`) it misses them, and a process that never
imported torch (the CLI, a benchmark worker) fails to start the provider or fails at its first cuDNN
kernel. Loading each library by its full path with RTLD_GLOBAL, a library after those it links to,
puts it in the process: every later lookup of that soname, the provider's included, gets this copy.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CUDA_MAJOR = 13  # what onnxruntime-gpu 1.31 is built for; used where the build does not say
NOT_FOUND = "not found in any nvidia/*/lib folder on sys.path nor on the system's library path"


@dataclass(frozen=True)
class Library:
    soname: str
    required: bool  # False: onnxruntime opens it only for a few operators and runs without it otherwise


def libraries(cuda_major: int) -> list[Library]:
    """What the CUDA provider loads, in load order: cuBLAS after cuBLASLt, which it links to."""
    return [
        Library(f"libcudart.so.{cuda_major}", True),
        Library(f"libcublasLt.so.{cuda_major}", True),
        Library(f"libcublas.so.{cuda_major}", True),
        Library("libcurand.so.10", True),  # cuRAND kept its soname across CUDA 12 and 13
        Library(f"libnvrtc.so.{cuda_major}", False),
        Library(f"libcufft.so.{cuda_major - 1}", False),  # cuFFT 12 ships with CUDA 13, 11 with CUDA 12
        # Opened on first use; cuDNN opens its own parts (libcudnn_ops.so.9, ...) from its folder.
        Library("libcudnn.so.9", True),
    ]


def cuda_major(build_cuda_version: str | None) -> int:
    """The CUDA major version onnxruntime was built for ("13.0" -> 13); the default for a CPU build."""
    head = (build_cuda_version or "").split(".")[0]
    return int(head) if head.isdigit() else DEFAULT_CUDA_MAJOR


def nvidia_lib_dirs(search_path: list[str]) -> list[Path]:
    """Every nvidia/<package>/lib folder under the entries of search_path, in its order, each
    followed by its subfolders (an architecture folder such as lib/x86_64, where a package has one)."""
    dirs = []
    for entry in search_path:
        root = Path(entry or ".") / "nvidia"  # "" on sys.path is the current directory
        if root.is_dir():
            for lib in sorted(d for d in root.glob("*/lib") if d.is_dir()):
                dirs += [lib, *sorted(d for d in lib.iterdir() if d.is_dir())]
    return dirs


def find(major: int, search_path: list[str] | None = None) -> dict[str, Path]:
    """Each library's first copy in an nvidia package folder on search_path (sys.path by default)."""
    dirs = nvidia_lib_dirs(sys.path if search_path is None else search_path)
    found = {}
    for lib in libraries(major):
        path = next((d / lib.soname for d in dirs if (d / lib.soname).is_file()), None)
        if path is not None:
            found[lib.soname] = path
    return found


def dlopen(name: str) -> None:
    """Load a shared library for the whole process (RTLD_GLOBAL). Raises OSError when it cannot."""
    ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


def preload(major: int, search_path: list[str] | None = None) -> dict[str, str]:
    """Load every library in order: from its nvidia package folder, else by name from the system's
    library path. Returns {soname: why} for the required ones that could not be loaded (empty when
    the provider has all it needs). Loading a library the process already has does nothing."""
    found = find(major, search_path)
    missing = {}
    for lib in libraries(major):
        path = found.get(lib.soname)
        try:
            dlopen(str(path) if path else lib.soname)
        except OSError as e:
            error = " ".join(str(e).split())[:200]  # one line
            why = f"found at {path} but failed to load ({error})" if path else NOT_FOUND
            log.debug("%s not loaded: %s", lib.soname, why)
            if lib.required:
                missing[lib.soname] = why
            continue
        log.debug("loaded %s from %s", lib.soname, path or "the system's library path")
    return missing


def describe(missing: dict[str, str]) -> str:
    """One line naming the missing libraries and why each is missing."""
    by_reason: dict[str, list[str]] = {}
    for soname, why in missing.items():
        by_reason.setdefault(why, []).append(soname)
    return "; ".join(f"{', '.join(names)} {why}" for why, names in by_reason.items())
