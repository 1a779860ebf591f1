"""The 8-bit kernels onnxruntime offers for a weight matrix, side by side by rows per call: what a
step of 1, 4, 16 or 64 rows costs in each, and how far each lands from fp32.

    python -m gpt2onnx.benchmarks.matmul_kernels --shape 768x3072 --shape 1280x5120 --out DIR

Each kernel is a graph of `--layers` copies of one weight (different values, so no cache holds
them all), run on the CPU provider with `--threads` threads; a call's time is divided by the
copies. Candidates:

- `fp32`: MatMul.
- `nbits8-b128`, `nbits8-b32`, `nbits4-b64`: MatMulNBits (weight-only blocks), accuracy_level 4
  (activations in int8 inside the kernel), what quantized exports use today.
- `int8-row`: int8 weights per output column, activations quantized per row at run time
  (each row's own scale: a row's result never depends on the other rows), then MatMulInteger
  (u8 activations, s8 weights). `int7-row`: the same with weights in [-63, 63]: on x86 without
  AVX-512 VNNI, onnxruntime's u8 x s8 kernel adds pairs of products in 16 bits, which saturates
  with full-range weights (its docs: reduce_range); `error` shows it.
- `int8-row-s8s8`: int8 activations and weights, no zero points; `int8-row-u8u8`: both shifted
  to u8 (zero points 128). Other kernels of MLAS, exact on every CPU.
- `dqmm-tensor`: DynamicQuantizeMatMul, one activation scale for the whole call. Shown for its
  speed only: a row's result would depend on the others (not batch-invariant).

`error`: the largest |difference| from fp32 over the largest |fp32 output| (x from a standard
normal, weights 0.02 x standard normal). `rows_invariant`: row 0's output alone equals it in the
full call. The machine's CPU and instruction sets are recorded (benchmarks/machine.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .machine import machine_info

ROWS = (1, 4, 16, 64)
H = helper.make_node


def _nbits(bits: int, block: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=bits)
    quantizer = DefaultWeightOnlyQuantizer(config)

    def build(i: int, w: np.ndarray):
        packed, scales, _ = quantizer.qbits_block_quant(w)
        K, N = w.shape
        inits = [numpy_helper.from_array(packed, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
        node = H("MatMulNBits", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft", K=K, N=N,
                 bits=bits, block_size=block, accuracy_level=4)  # fmt: skip
        return inits, [node]

    return build


def _per_column(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / qmax
    return np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8), scale.astype(np.float32)


# Activations per row: scale = max|x| / 127, u8 = round(x / scale) + 128 (zero point 128).
ROW_QUANT = [
    H("Abs", ["x"], ["x_abs"]),
    H("ReduceMax", ["x_abs", "axis1"], ["x_max"], keepdims=1),
    H("Max", ["x_max", "tiny"], ["x_max1"]),
    H("Mul", ["x_max1", "inv127"], ["x_scale"]),
    H("Div", ["x", "x_scale"], ["x_div"]),
    H("Round", ["x_div"], ["x_round"]),
    H("Add", ["x_round", "c128"], ["x_shift"]),
    H("Cast", ["x_shift"], ["x_u8"], to=TensorProto.UINT8),
]
ROW_QUANT_S8 = [*ROW_QUANT[:6], H("Cast", ["x_round"], ["x_s8"], to=TensorProto.INT8)]
ROW_CONSTANTS = {
    "axis1": np.array([1], np.int64),
    "tiny": np.array(1e-12, np.float32),
    "inv127": np.array(1 / 127, np.float32),
    "c128": np.array(128, np.float32),
    "zp128": np.array(128, np.uint8),
}


def _per_row(qmax: int, kind: str = "u8s8"):
    def build(i: int, w: np.ndarray):
        q, scale = _per_column(w, qmax)
        inputs = {"u8s8": ["x_u8", f"w{i}", "zp128"], "s8s8": ["x_s8", f"w{i}"],
                  "u8u8": ["x_u8", f"w{i}", "zp128", "zp128"]}[kind]  # fmt: skip
        if kind == "u8u8":
            q = (q.astype(np.int16) + 128).astype(np.uint8)
        inits = [numpy_helper.from_array(q, f"w{i}"), numpy_helper.from_array(scale, f"s{i}")]
        nodes = [
            H("MatMulInteger", inputs, [f"acc{i}"]),
            H("Cast", [f"acc{i}"], [f"accf{i}"], to=TensorProto.FLOAT),
            H("Mul", [f"accf{i}", "x_scale"], [f"rowed{i}"]),
            H("Mul", [f"rowed{i}", f"s{i}"], [f"y{i}"]),
        ]
        if i == 0:
            inits += [numpy_helper.from_array(v, k) for k, v in ROW_CONSTANTS.items()]
            nodes = (ROW_QUANT_S8 if kind == "s8s8" else ROW_QUANT) + nodes
        return inits, nodes

    return build


def _dqmm(i: int, w: np.ndarray):
    q, scale = _per_column(w, 127)
    inits = [numpy_helper.from_array(q, f"w{i}"), numpy_helper.from_array(scale, f"s{i}")]
    return inits, [H("DynamicQuantizeMatMul", ["x", f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft")]


def _fp32(i: int, w: np.ndarray):
    return [numpy_helper.from_array(w, f"w{i}")], [H("MatMul", ["x", f"w{i}"], [f"y{i}"])]


KERNELS = {
    "fp32": _fp32,
    "nbits8-b128": _nbits(8, 128),
    "nbits8-b32": _nbits(8, 32),
    "nbits4-b64": _nbits(4, 64),
    "int8-row": _per_row(127),
    "int7-row": _per_row(63),
    "int8-row-s8s8": _per_row(127, "s8s8"),
    "int8-row-u8u8": _per_row(127, "u8u8"),
    "dqmm-tensor": _dqmm,
}


def session(build, weights: list[np.ndarray], threads: int) -> ort.InferenceSession:
    K, N = weights[0].shape
    inits, nodes = [], []
    for i, w in enumerate(weights):
        more_inits, more_nodes = build(i, w)
        inits += more_inits
        nodes += more_nodes
    outputs = [
        helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", N]) for i in range(len(weights))
    ]
    graph = helper.make_graph(
        nodes, "kernels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])], outputs, inits
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(shape: tuple[int, int], layers: int, threads: int, repeats: int) -> dict:
    K, N = shape
    gen = np.random.default_rng(0)
    weights = [(0.02 * gen.standard_normal((K, N))).astype(np.float32) for _ in range(layers)]
    sessions = {name: session(build, weights, threads) for name, build in KERNELS.items()}
    x = np.random.default_rng(1).standard_normal((max(ROWS), K)).astype(np.float32)
    want = sessions["fp32"].run(["y0"], {"x": x})[0]
    result = {"shape": f"{K}x{N}", "layers": layers, "kernels": {}}
    for name, sess in sessions.items():
        got = sess.run(["y0"], {"x": x})[0]
        alone = sess.run(["y0"], {"x": x[:1]})[0]
        result["kernels"][name] = {
            "error": float(np.abs(got - want).max() / np.abs(want).max()),
            "rows_invariant": bool(np.array_equal(alone[0], got[0])),
            "us_per_matrix": {},
        }
    for rows in ROWS:
        feed = {"x": x[:rows]}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats):  # alternating kernels, so the machine's drift hits them alike
            for name, sess in sessions.items():
                sess.run(None, feed)
                t0 = time.perf_counter()
                for _ in range(5):
                    sess.run(None, feed)
                times[name].append((time.perf_counter() - t0) / 5 / layers * 1e6)
        for name in sessions:
            result["kernels"][name]["us_per_matrix"][rows] = float(np.median(times[name]))
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| shape | kernel | " + " | ".join(f"{r} rows (us)" for r in ROWS) + f" | {ROWS[-1]} / 1 | error | row-invariant |",
        "|---|---|" + "---:|" * (len(ROWS) + 2) + "---|",
    ]  # fmt: skip
    for res in results:
        for name, k in res["kernels"].items():
            us = k["us_per_matrix"]
            cells = " | ".join(f"{us[r]:.0f}" for r in ROWS)
            lines.append(f"| {res['shape']} | {name} | {cells} | {us[ROWS[-1]] / us[1]:.1f} | "
                         f"{k['error']:.2g} | {'yes' if k['rows_invariant'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="KxN of the weight (repeatable; default 768x3072)")
    parser.add_argument("--layers", type=int, default=6, help="copies of the weight in the graph")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="folder for kernels.json and kernels.md")
    args = parser.parse_args(argv)
    shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shape or ["768x3072"]]
    results = [measure(s, args.layers, args.threads, args.repeats) for s in shapes]
    report = {"machine": machine_info(), "threads": args.threads, "results": results}
    text = table(results)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.json").write_text(json.dumps(report, indent=1))
        (args.out / "kernels.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
