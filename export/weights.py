"""Weights kept out of the graph's protobuf until they are written, one tensor at a time.

Why: a protobuf holding the weights is a full copy of them, and every step that loads, fuses,
quantizes or serializes such a graph made another (an export peaked at seven times its
weights). Here the graph is traced without its parameters (export_params=False), and each
weight becomes a placeholder initializer: its name, shape and type, with the bytes left in a
`Weights` map (numpy views of the PyTorch parameters, or the quantizer's output). Fusion and
quantization work on the small graph; `write` then streams each tensor to the external data
file (or, for a small model, into the one model file) and `check_written` reads them back in
chunks against the map, so the export check can run onnxruntime on the map's arrays instead of
a second copy (export/exporter.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gpt2onnx.engine.contract import UserError

Weights = dict[str, np.ndarray]  # initializer name -> its bytes, for every placeholder in the graph

UNWRITTEN = "<in memory: export/weights.py>"  # a placeholder's external-data location until written
ALIGN = 4096  # each tensor's offset in the data file: a page, so onnxruntime may map it
CHUNK = 1 << 26  # bytes compared at a time when the written file is read back


class WeightsWriteError(UserError, OSError):
    """The weights on disk are not the bytes that were written (a full or failing disk)."""


def placeholder(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer with `array`'s name, shape and type and no bytes (they stay in Weights)."""
    tensor = onnx.TensorProto(name=name, dims=array.shape)
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=UNWRITTEN)
    return tensor


def is_placeholder(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == UNWRITTEN for e in tensor.external_data
    )


def parameters_to_placeholders(proto: onnx.ModelProto, module) -> Weights:
    """The parameters a graph traced with export_params=False takes as inputs become placeholder
    initializers; returns their arrays (views of `module`'s parameters, no copies). The tracer
    names each input after its parameter and keeps one of any parameters with equal values.
    Vectors (biases, LayerNorm gains) go in inline instead: graph fusion reads them."""
    params = dict(module.named_parameters())
    graph, weights = proto.graph, {}
    for value in [v for v in graph.input if v.name in params]:
        array = params[value.name].detach().numpy()
        graph.input.remove(value)
        if array.ndim < 2:  # biases and LayerNorm gains, inline: fusion reads them (a few MB in all)
            graph.initializer.append(numpy_helper.from_array(array, value.name))
            continue
        weights[value.name] = array
        graph.initializer.append(placeholder(value.name, array))
    return weights


def array_of(tensor: onnx.TensorProto, weights: Weights) -> np.ndarray:
    """An initializer's values: from `weights` for a placeholder (or one written from there),
    else from the graph itself."""
    return weights[tensor.name] if tensor.name in weights else numpy_helper.to_array(tensor)


def weight_bytes(proto: onnx.ModelProto, weights: Weights) -> int:
    return sum(
        weights[t.name].nbytes if is_placeholder(t) else len(t.raw_data) for t in proto.graph.initializer
    )


def write(proto: onnx.ModelProto, weights: Weights, path: Path, external: str | None) -> None:
    """Write `path`: the graph with every placeholder's bytes in the file `external` beside it
    (each at a page-aligned offset; `proto` is left pointing at them), or, with external None,
    inline in the one file (a small model: the graph holds them while it is saved)."""
    if external is None:
        inline = [t for t in proto.graph.initializer if is_placeholder(t)]
        for tensor in inline:
            tensor.ClearField("external_data")
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = _bytes(weights[tensor.name]).tobytes()
        onnx.save_model(proto, str(path))
        for tensor in inline:  # placeholders again: the bytes stay in `weights` alone
            tensor.CopyFrom(placeholder(tensor.name, weights[tensor.name]))
        return
    with open(path.parent / external, "wb") as f:
        for tensor in proto.graph.initializer:
            if not is_placeholder(tensor):
                continue
            offset = -f.tell() % ALIGN
            f.write(b"\0" * offset)
            offset, data = f.tell(), _bytes(weights[tensor.name])
            f.write(data)
            tensor.ClearField("external_data")
            for key, value in (("location", external), ("offset", offset), ("length", len(data))):
                tensor.external_data.add(key=key, value=str(value))
        f.flush()
        os.fsync(f.fileno())
    path.write_bytes(proto.SerializeToString())


def check_written(proto: onnx.ModelProto, weights: Weights, folder: Path) -> None:
    """Read every external tensor of the written graph back, a chunk at a time, against its bytes
    in `weights`. Raises WeightsWriteError naming the first that differs."""
    for tensor in proto.graph.initializer:
        if tensor.name not in weights or tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        want = _bytes(weights[tensor.name])
        with open(folder / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            for start, got in _chunks(f, int(info["length"])):
                if got != want[start : start + len(got)]:
                    raise WeightsWriteError(
                        f"{info['location']} does not hold the bytes written for {tensor.name} (from byte "
                        f"{start}); check the disk (space, errors) and export again"
                    )
        if len(want) != int(info["length"]):
            raise WeightsWriteError(f"{tensor.name} was written with the wrong length; export again")


def _bytes(array: np.ndarray) -> memoryview:
    """The array's bytes without a copy (a copy only if it is not contiguous)."""
    return memoryview(np.ascontiguousarray(array)).cast("B")


def _chunks(f, length: int) -> Iterator[tuple[int, bytes]]:
    start = 0
    while start < length:
        got = f.read(min(CHUNK, length - start))
        if not got:
            raise WeightsWriteError(f"{f.name} ends early: the weights are cut short; export again")
        yield start, got
        start += len(got)
