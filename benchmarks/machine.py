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


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
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
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions("gpt2-onnx", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "torch", "transformers", "tokenizers"),
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


def bandwidth_method(device: str, repeats: int = 10) -> str:
    """How read_bandwidth_gbs measured, for the results file."""
    return f"onnxruntime MatMul (1x1024)@(1024xN) over {BANDWIDTH_MIB[device]} MiB of fp32 weights on {device}, all threads, median of {repeats}"


def read_bandwidth_gbs(device: str = "cpu", repeats: int = 10) -> float:
    """Weight-streaming read bandwidth through onnxruntime itself: a (1 x 1024) @ (1024 x N) MatMul
    over BANDWIDTH_MIB[device] of float32 weights, all threads. A memory-bound decode step cannot
    read its weights faster than this, so it is the floor the benchmarks compare against. The
    weights are larger than any cache (with 128 MiB this CPU's caches inflate the figure by half).
    On a GPU, input and output stay on the device (IO binding), so no host copy is timed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gpt2onnx.engine.session import create_session

    k, n = 1024, BANDWIDTH_MIB[device] * 2**20 // 4 // 1024
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "bandwidth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session, device, _ = create_session(model.SerializeToString(), device, None)
    io = session.io_binding()
    io.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(np.ones((1, k), dtype=np.float32), device, 0))
    io.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_shape_and_type((1, n), np.float32, device, 0))
    session.run_with_iobinding(io)  # run_with_iobinding waits for the device before returning
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
    return k * n * 4 / float(np.median(times)) / 1e9
