"""Where a decode step's time goes: the step as the engine runs it, and each of its parts alone.

    python -m gpt2onnx.benchmarks.step_profile MODEL_FOLDER [--provider cuda] [--batch 1]
        [--max-seq 256,1024] [--steps 200] [--json FILE]

For each cache length (max_seq) and CUDA graphs on and off: a prompt of 32 tokens is prefilled,
then `--steps` decode steps are timed, whole (`Session.decode`) and in parts: binding the step's
inputs (the host-to-device copies of the graph path included), the model's run alone (the same
step run again: a step is idempotent), and reading the ids back. Medians in microseconds. The
model's run against max_seq says whether attention costs grow with the cache's size rather than
its contents. A tool for a GPU session's spare minutes; nothing here is a target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from gpt2onnx.engine.clock import Clock
from gpt2onnx.engine.engine import Engine


def median_us(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def profile(folder: str, provider: str, batch: int, max_seq: int, graphs: bool, steps: int) -> dict:
    engine = Engine.load(folder, provider=provider, max_batch=batch, max_seq=max_seq, cuda_graphs=graphs)
    session = engine.session
    prompts = [list(range(100, 132))] * batch
    session.start(batch, max_seq, Clock())  # every row greedy: the graph's own argmax picks
    tokens = session.prefill(prompts)
    for _ in range(8):  # warm-up; captures the bucket's graph
        tokens = session.decode(tokens)
    left = max_seq - 32 - 8 - 1
    n = min(steps, left // 3)  # three timed loops below each add positions

    def whole():
        nonlocal tokens
        tokens = session.decode(tokens)

    bucket = session.cache.bind_decode(session.binding, tokens)  # a step bound, for the parts alone
    session.picker.bind(session.binding, session.cache.outputs, session.cache.rows)
    result = {
        "max_seq": max_seq,
        "cache_positions": session.cache.kv.cap_seq,
        "cuda_graphs": session.cuda_graphs,
        "provider": session.device,
        "batch": batch,
        "decode_step_us": median_us(whole, n),
        "bind_us": median_us(lambda: session.cache.bind_decode(session.binding, tokens), n),
        "run_us": median_us(
            lambda: session.graphs.run("decode", session.ort_session, session.binding, bucket), n
        ),
        "read_ids_us": median_us(lambda: session.picker.pick(session.cache.outputs, batch, bucket=bucket), n),
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="an exported model folder (the shared cache for CUDA graphs)")
    p.add_argument("--provider", default="cuda", choices=["cuda", "cpu", "auto"], help="execution provider")
    p.add_argument("--batch", type=int, default=1, help="rows per step")
    p.add_argument("--max-seq", default="256,1024", help="cache lengths to compare, comma-separated")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    rows = [
        profile(args.folder, args.provider, args.batch, int(s), graphs, args.steps)
        for s in args.max_seq.split(",")
        for graphs in (True, False)
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
