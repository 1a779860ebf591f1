"""What a benchmark result must carry about where it ran, and the machine's memory bandwidth."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The instruction sets that rank the CPU kernels differently (8-bit dot products above all).
ISA = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_isa() -> list[str]:
    """Which of ISA the CPU has (Linux's /proc/cpuinfo flags; empty where it cannot be read)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [name for name in ISA if name in flags]
    except OSError:
        pass
    return []


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def versions(*packages: str) -> dict[str, str]:
    found = {}
    for p in packages:
        try:
            found[p] = version(p)
        except PackageNotFoundError:
            pass
    return found


def machine_info() -> dict:
    return {
        "cpu": cpu_name(),
        "isa": cpu_isa(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(
            "gpt2-onnx",
            "onnxruntime-gpu",
            "onnxruntime",
            "onnx",
            "numpy",
            "torch",
            "transformers",
            "tokenizers",
        ),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: the latter survives exec, so a
    worker would report its parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


BANDWIDTH_MIB = {"cpu": 512, "cuda": 2048}  # weights streamed by the probe: larger than any cache
PROBE_K = 1024  # rows of the probe's weight: (1 x K) @ (K x N)


def probe_shape(mib: int) -> tuple[int, int]:
    """(K, N) of a float32 weight of `mib` MiB."""
    return PROBE_K, mib * 2**20 // 4 // PROBE_K


def probe_model(k: int, n: int):
    """y = x @ w with the weight w a graph input, not an initializer: the serialized graph is a few
    hundred bytes whatever the weight's size. (A 2 GiB initializer is over protobuf's 2 GB limit:
    the in-memory model cannot even be serialized, so the GPU benchmark died before any runner.)"""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "bandwidth",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in (("x", [1, k]), ("w", [k, n]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def bandwidth_method(device: str, repeats: int = 10, mib: int | None = None) -> str:
    """How read_bandwidth_gbs measured, for the results file."""
    mib = mib or BANDWIDTH_MIB[device]
    return (
        f"onnxruntime MatMul (1x{PROBE_K})@({PROBE_K}xN) streaming {mib} MiB of fp32 weights per run, "
        f"bound as an input already on {device} (IO binding), all threads, median of {repeats}"
    )


def read_bandwidth_gbs(device: str = "cpu", repeats: int = 10, mib: int | None = None) -> float:
    """Weight-streaming read bandwidth through onnxruntime itself: a (1 x 1024) @ (1024 x N) MatMul
    over `mib` (default BANDWIDTH_MIB[device]) of float32 weights, all threads. A memory-bound decode
    step cannot read its weights faster than this, so it is the floor the benchmarks compare against.
    The weights are larger than any cache (with 128 MiB this CPU's caches inflate the figure by half).
    The weight, input and output live on the device, bound with IO binding, so no host copy is
    timed and the model itself holds no weights (see probe_model)."""
    import onnxruntime as ort

    # here, not above: the transformers workers import this module in a venv without gpt2onnx
    from gpt2onnx.engine.runtime import create_session, device_of

    k, n = probe_shape(mib or BANDWIDTH_MIB[device])
    session, _ = create_session(probe_model(k, n).SerializeToString(), device, None)
    device = device_of(session)
    host_weight = np.random.default_rng(0).standard_normal(
        (k, n), dtype=np.float32
    )  # random: nothing to compress
    weight = ort.OrtValue.ortvalue_from_numpy(
        host_weight, device, 0
    )  # on the CPU it shares host_weight's memory
    io = session.io_binding()
    io.bind_ortvalue_input(
        "x", ort.OrtValue.ortvalue_from_numpy(np.ones((1, k), dtype=np.float32), device, 0)
    )
    io.bind_ortvalue_input("w", weight)
    io.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_shape_and_type((1, n), np.float32, device, 0))
    session.run_with_iobinding(io)  # run_with_iobinding waits for the device before returning
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
    return k * n * 4 / float(np.median(times)) / 1e9
