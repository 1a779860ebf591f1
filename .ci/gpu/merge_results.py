"""Merge the per-batch benchmark files of a GPU run into one result folder, for benchmarks/results/.

phase2 runs one `gpt2-onnx bench` per batch size so that each batch's figures come back as soon as
it ends (bench-b1.json, bench-b64.json, ...). The committed result is one results.json with every
runner's rows over all batches, written by the benchmarks' own report (results.md and the plots),
so the README's figures trace to one folder. Runs here, after the run, in the project's venv:

    .venv/bin/python .ci/gpu/merge_results.py benchmarks/results/h100-2026-11-25-fp16 OUT/bench-b*.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path


def merge(parts: list[dict]) -> dict:
    """The first file's machine and model; every runner's rows of every file; the settings' batches
    and configurations as their union; each file's measured bandwidth kept."""
    merged = copy.deepcopy(parts[0])
    merged["machine"]["read_bandwidth_gbs_per_file"] = [p["machine"]["read_bandwidth_gbs"] for p in parts]
    for part in parts[1:]:
        if part["model"] != merged["model"]:
            raise ValueError(f"the files benchmark different models: {merged['model']} and {part['model']}")
        for name, data in part["runners"].items():
            if name not in merged["runners"]:
                merged["runners"][name] = copy.deepcopy(data)
                continue
            mine = merged["runners"][name]
            mine.setdefault("results", []).extend(copy.deepcopy(data.get("results", [])))
            for key in ("error", "skipped"):
                if key in data and key not in mine:
                    mine[key] = data[key]
        merged["failures"] = merged.get("failures", []) + part.get("failures", [])
        settings = merged["settings"]
        settings["batches"] = sorted(set(settings["batches"]) | set(part["settings"]["batches"]))
        settings["configs"] = sorted({tuple(c) for c in settings["configs"] + part["settings"]["configs"]})
    for data in merged["runners"].values():
        data.get("results", []).sort(key=lambda r: (r["batch"], r["prompt_len"], r["new_tokens"]))
    if not merged.get("failures"):
        merged.pop("failures", None)
    return merged


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: merge_results.py OUT_FOLDER BENCH_JSON [BENCH_JSON ...]", file=sys.stderr)
        return 2
    from gpt2onnx.benchmarks import report

    out = Path(argv[0])
    merged = merge([json.loads(Path(p).read_text()) for p in argv[1:]])
    out.mkdir(parents=True, exist_ok=True)
    for path in report.write(merged, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
