"""One measurement in this process: decode ms/token and Python overhead per step, batch 1 and 8."""

import json
import sys

import gpt2onnx
from gpt2onnx import Engine

folder, label = sys.argv[1], sys.argv[2]
engine = Engine.load(folder, provider="cpu", max_batch=8, threads=2)
assert gpt2onnx.__file__.startswith(sys.argv[3]), gpt2onnx.__file__
prompt = list(range(1000, 1032))
out = {"tree": label}
for batch in (1, 8):
    engine.generate([prompt] * batch, max_new_tokens=8, ignore_eos=True)  # warm-up
    ms, over = [], []
    for _ in range(3):
        t = engine.generate([prompt] * batch, max_new_tokens=64, ignore_eos=True).timing
        ms.append(t.as_dict()["decode_ms_per_token"])
        over.append(t.python_overhead_ms())
    out[f"b{batch}_ms_per_step"] = sorted(ms)[1]
    out[f"b{batch}_overhead_ms"] = sorted(over)[1]
print(json.dumps(out))
