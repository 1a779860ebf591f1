"""Peak memory and time of `gpt2-onnx export` at each GPT-2 size and dtype (the README's table).

Each export runs as its own process (`python -m gpt2onnx export --random-init SIZE`), one at a
time, measured as /usr/bin/time -v measures it: the child's peak resident set (ru_maxrss, from
wait4) and its wall time. The ratio is over the fp32 weight bytes (parameters x 4), the measure
of the targets: an fp32 export within 2.5x, the others within 3x.

    python -m benchmarks.export_memory --sizes gpt2,gpt2-medium --dtypes fp32,int8 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2onnx.engine.contract import GPT2Config
from gpt2onnx.export.checkpoint import SIZES, canonical_size

from .machine import machine_info

LIMITS = {"fp32": 2.5, "fp16": 3.0, "int8": 3.0, "int4": 3.0}  # peak over the fp32 weight bytes


def measure(size: str, dtype: str, kv_cache: str, workdir: Path) -> dict:
    """One export in a child process: its peak RSS, wall time and exit status."""
    out = workdir / f"{size}-{dtype}"
    cmd = [sys.executable, "-m", "gpt2onnx", "export", "--random-init", size, "--dtype", dtype,
           "--kv-cache", kv_cache, "--output", str(out), "--force"]  # fmt: skip
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    error = child.stderr.read().strip().splitlines()[-1:] if status else []
    child.stderr.close()
    shutil.rmtree(out, ignore_errors=True)
    weights = GPT2Config(**SIZES[size]).n_params * 4
    peak = usage.ru_maxrss * 1024  # kB on Linux
    return {"size": size, "dtype": dtype, "kv_cache": kv_cache, "ok": status == 0, "error": error,
            "seconds": round(seconds, 1), "peak_rss_bytes": peak, "fp32_weight_bytes": weights,
            "peak_over_weights": round(peak / weights, 2), "limit": LIMITS[dtype]}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = ["| size | dtype | fp32 weights GB | export s | peak RSS GB | peak / weights | limit |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        peak = f"{r['peak_rss_bytes'] / 1e9:.2f}" if r["ok"] else f"failed: {' '.join(r['error'])}"
        lines.append(f"| {r['size']} | {r['dtype']} | {r['fp32_weight_bytes'] / 1e9:.2f} | {r['seconds']} | "
                     f"{peak} | {r['peak_over_weights']}x | {r['limit']}x |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated GPT-2 sizes")
    p.add_argument("--dtypes", default="fp32,fp16,int8,int4", help="comma-separated dtypes")
    p.add_argument("--kv-cache", default="shared", help="the exported cache (export's default: shared)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-memory-") as work:
        for size in args.sizes.split(","):
            for dtype in args.dtypes.split(","):
                rows.append(measure(canonical_size(size), dtype, args.kv_cache, Path(work)))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    (args.out / "results.json").write_text(json.dumps({"machine": info, "exports": rows}, indent=1))
    head = f"Machine: {info['cpu']}, {info['cores']} cores. `python -m benchmarks.export_memory` (one export at a time).\n\n"
    (args.out / "results.md").write_text(head + table(rows) + "\n")
    return 0 if all(r["ok"] and r["peak_over_weights"] <= r["limit"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
