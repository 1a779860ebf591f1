"""An experiment for the 8-bit path that scales with rows: an fp32 model folder rewritten so that
every weight MatMul runs as per-row u8 x u8 `MatMulInteger` (benchmarks/matmul_kernels.py chose it on
AVX2 without VNNI: exact, and half the time of MatMulNBits at 64 rows), timed as whole decode
steps of 1, 4 and 16 rows beside today's int8 (MatMulNBits) and fp32 exports of the same weights.

    python -m gpt2onnx.benchmarks.rows_int8 FP32_FOLDER INT8_FOLDER --out DIR [--text FILE]

Not an export format yet: the folder it writes keeps the fp32 manifest (the engine loads any
graph that keeps the contract's inputs and outputs). Each weight W (K, N) becomes u8 = round(W /
s) + 128 per output column (s = max|W[:, n]| / 127, zero point 128); each activation row x
becomes u8 = round(x / r) + 128 with r = max|x| / 127, its own scale, so a row's result never
depends on the other rows; y = (x_u8 - 128) @ (W_u8 - 128) * r * s. With --text, the perplexity
of each folder on it (stride 64) says what the rounding costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .machine import machine_info

H = helper.make_node


def rewrite(src: Path, out: Path) -> int:
    """Write `out`: `src`'s folder with each weight MatMul in per-row u8 x u8. Returns how many."""
    model = onnx.load(str(src / "model.onnx"))  # with its external data
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, quantized, done = [], 0, {}  # done: activation -> (its u8, its row scale)
    constants = {
        "rows_inv127": np.array(1 / 127, np.float32),
        "rows_tiny": np.array(1e-12, np.float32),
        "rows_128f": np.array(128, np.float32),
        "rows_zp": np.array(128, np.uint8),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    for node in graph.node:
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w_name not in inits or len(inits[w_name].dims) != 2:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127
        w_u8 = (np.clip(np.round(w / scale), -127, 127) + 128).astype(np.uint8)
        graph.initializer.extend([numpy_helper.from_array(w_u8, f"{w_name}_u8"),
                                  numpy_helper.from_array(scale.astype(np.float32), f"{w_name}_colscale")])  # fmt: skip
        x = node.input[0]
        if x not in done:
            p = f"{x}_rows"
            nodes += [
                H("Abs", [x], [f"{p}_abs"]),
                H("ReduceMax", [f"{p}_abs"], [f"{p}_max"], axes=[-1], keepdims=1),
                H("Max", [f"{p}_max", "rows_tiny"], [f"{p}_max1"]),
                H("Mul", [f"{p}_max1", "rows_inv127"], [f"{p}_scale"]),
                H("Div", [x, f"{p}_scale"], [f"{p}_div"]),
                H("Round", [f"{p}_div"], [f"{p}_round"]),
                H("Add", [f"{p}_round", "rows_128f"], [f"{p}_shift"]),
                H("Cast", [f"{p}_shift"], [f"{p}_u8"], to=TensorProto.UINT8),
            ]
            done[x] = (f"{p}_u8", f"{p}_scale")
        x_u8, row_scale = done[x]
        y, q = node.output[0], f"{w_name}_rows"
        nodes += [
            H("MatMulInteger", [x_u8, f"{w_name}_u8", "rows_zp", "rows_zp"], [f"{q}_acc"]),
            H("Cast", [f"{q}_acc"], [f"{q}_accf"], to=TensorProto.FLOAT),
            H("Mul", [f"{q}_accf", row_scale], [f"{q}_rowed"]),
            H("Mul", [f"{q}_rowed", f"{w_name}_colscale"], [y]),
        ]
        quantized += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy(f, out / f.name)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["external_data"] = "model.onnx.data"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return quantized


def step_ms(folder: Path, rows: int, new_tokens: int) -> float:
    from gpt2onnx.engine.engine import Engine

    engine = Engine.load(folder, provider="cpu", max_batch=max(rows, 1), threads=2)
    prompt = list(range(1000, 1032))
    engine.generate([prompt] * rows, max_new_tokens=4, ignore_eos=True)  # warm-up
    runs = [engine.generate([prompt] * rows, max_new_tokens=new_tokens, ignore_eos=True) for _ in range(3)]
    return float(np.median([r.timing.as_dict()["decode_ms_per_token"] for r in runs]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fp32", type=Path, help="an fp32 model folder")
    parser.add_argument("int8", type=Path, help="the int8 (MatMulNBits) export of the same weights")
    parser.add_argument(
        "--out", type=Path, required=True, help="results folder (the rewritten model goes in it)"
    )
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--text", type=Path, help="a text for the perplexity of each folder")
    args = parser.parse_args(argv)
    rows_folder = args.out / "model-rows"
    n = rewrite(args.fp32, rows_folder)
    folders = {"fp32": args.fp32, "int8-nbits": args.int8, "int8-rows": rows_folder}
    times: dict[str, dict[int, list[float]]] = {k: {} for k in folders}
    for _ in range(args.rounds):  # alternating, so the machine's drift hits them alike
        for r in map(int, args.rows.split(",")):
            for name, folder in folders.items():
                times[name].setdefault(r, []).append(step_ms(folder, r, args.new_tokens))
    result = {"machine": machine_info(), "matmuls": n, "ms_per_step": {
        k: {r: float(np.median(v)) for r, v in t.items()} for k, t in times.items()}}  # fmt: skip
    if args.text:
        from gpt2onnx.engine.engine import Engine

        text = args.text.read_text()
        result["perplexity"] = {
            k: Engine.load(f, provider="cpu").score(text, prepend_bos=False, stride=64).perplexity
            for k, f in folders.items()
        }
    (args.out / "rows_int8.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
