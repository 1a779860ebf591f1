"""The GPU phases' checks of the CUDA provider, each one line (.ci/gpu/README.md).

gate: refuse (exit 4) unless onnxruntime lists CUDAExecutionProvider and the NVIDIA driver sees a
GPU. Both are needed: onnxruntime-gpu lists the provider on machines without a GPU, and the GPU
machine's own onnxruntime is CPU-only until .ci/gpu/install-ort has put onnxruntime-gpu first.
session: in a process that never imports torch (as a benchmark worker or the CLI), create a
session through the engine's own create_session and run a fp16 MatMul (cuBLAS) on CUDA.
machine FILE: what the results need to name (GPU, driver, onnxruntime), as JSON.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

INSTALL_HINT = (
    "stage and install onnxruntime-gpu first (.ci/stage-ort-gpu, .ci/gpu/install-ort; see .ci/gpu/README.md)"
)


def gate() -> int:
    try:
        import onnxruntime as ort
    except ImportError as e:
        print(f"refused: onnxruntime cannot be imported ({e}); {INSTALL_HINT}", file=sys.stderr)
        return 4
    from gpt2onnx.engine.runtime import cuda_device_count  # the engine's own driver probe

    providers, gpus = ort.get_available_providers(), cuda_device_count()
    found = f"onnxruntime {ort.__version__} from {ort.__file__}, providers {providers}, "
    found += f"GPUs seen by the driver: {gpus}"
    if "CUDAExecutionProvider" not in providers:
        print(f"refused: no usable CUDA provider here ({found}); {INSTALL_HINT}", file=sys.stderr)
        return 4
    if gpus == 0:
        print(
            f"refused: no usable CUDA provider here ({found}): the NVIDIA driver sees no GPU; "
            "run the phases on the GPU machine (.ci/gpu/README.md)",
            file=sys.stderr,
        )
        return 4
    print(f"cuda gate: onnxruntime {ort.__version__} from {ort.__file__}, {gpus} GPU(s)")
    return 0


def matmul_model() -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((64, 64), 0.5, dtype=np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 64])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # opset 17's
    return model.SerializeToString()  # (a newer onnx writes an IR version onnxruntime may not read yet)


def session() -> int:
    import numpy as np

    from gpt2onnx.engine.runtime import create_session, resolve_device

    sess = create_session(matmul_model(), resolve_device("cuda"), None, strict=True)[0]
    first = sess.get_providers()[0]
    y = sess.run(None, {"x": np.ones((4, 64), dtype=np.float16)})[0]
    torch_loaded = "torch" in sys.modules
    ok = first == "CUDAExecutionProvider" and float(y[0, 0]) == 32.0 and not torch_loaded
    print(
        f"cuda session without torch: provider {first}, MatMul {float(y[0, 0])} (want 32.0), "
        f"torch imported: {torch_loaded} -> {'ok' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def machine(path: str) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import onnxruntime as ort

    if shutil.which("nvidia-smi") is None:
        print("machine: nvidia-smi is not on PATH", file=sys.stderr)
        return 1
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    versions = {}
    for name in ("torch", "onnx", "numpy", "transformers", "tokenizers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    info = {
        "gpus": [line.split(", ") for line in smi.stdout.strip().splitlines()],
        "nvidia_smi_exit": smi.returncode,
        "onnxruntime": ort.__version__,
        "onnxruntime_file": ort.__file__,
        "providers": ort.get_available_providers(),
        "python": sys.version.split()[0],
        "versions": versions,
    }
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(f"machine: {info['gpus']}, onnxruntime {ort.__version__}, torch {versions['torch']}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["gate"] and len(argv) == 1:
        return gate()
    if argv[:1] == ["session"] and len(argv) == 1:
        return session()
    if argv[:1] == ["machine"] and len(argv) == 2:
        return machine(argv[1])
    print("usage: python3 .ci/gpu/check_cuda.py gate | session | machine FILE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
