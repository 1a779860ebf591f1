"""Decode speed by model size: ours (int8, fp32) against llama.cpp (q8_0, f32) at batch 1, for
each GPT-2 size, every comparison within one `gpt2-onnx bench` run.

One bench run per size (`--random-init SIZE --dtype int8` with gpt2-onnx-fp32 and the two
llama.cpp runners beside it; llama.cpp needs .ci/setup-llamacpp), then a table and a figure with
the parameter count on the x axis. Times compare only within a size's run: never across machines.

    python -m benchmarks.sizes --sizes gpt2,gpt2-medium,gpt2-large,gpt2-xl --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from gpt2onnx.export.checkpoint import canonical_size

RUNNERS = {  # runner -> (what it is, its peer)
    "gpt2-onnx": ("ours int8", "llama.cpp-q8_0"),
    "gpt2-onnx-fp32": ("ours fp32", "llama.cpp-f32"),
}
BASELINES = "gpt2-onnx-fp32,llama.cpp-q8_0,llama.cpp-f32"


def bench(size: str, out: Path, models: Path, new_tokens: int, repeats: int, kv_cache: str) -> dict:
    cmd = [sys.executable, "-m", "gpt2onnx", "bench", "--random-init", size, "--dtype", "int8", "--kv-cache", kv_cache,
           "--baselines", BASELINES, "--batches", "1", "--prompt-lens", "32", "--new-tokens", str(new_tokens),
           "--repeats", str(repeats), "--warmup", "1", "--provider", "cpu", "--models-dir", str(models),
           "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())


def decode_ms(result: dict, runner: str) -> float | None:
    entry = result["runners"].get(runner)
    if not entry or not entry.get("results"):
        return None
    return statistics.median(r["decode_ms_per_token"] for r in entry["results"][0]["runs"])


def rows_of(results: dict[str, dict]) -> list[dict]:
    rows = []
    for size, result in results.items():
        row = {"size": size, "n_params": result["model"]["n_params"]}
        for runner in ("gpt2-onnx", "gpt2-onnx-fp32", "llama.cpp-q8_0", "llama.cpp-f32"):
            row[runner] = decode_ms(result, runner)
        rows.append(row)
    return rows


def table(rows: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores. Batch 1, prompt 32, greedy; decode ms/token, "
        "median of the timed runs; each size is one `gpt2-onnx bench` run (peers in the same run).",
        "",
        "| size | params | ours int8 | llama.cpp q8_0 | q8_0 / ours | ours fp32 | llama.cpp f32 | f32 / ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(v):
        return "–" if v is None else f"{v:.2f}"

    def ratio(peer, ours):
        return "–" if peer is None or ours is None else f"{peer / ours:.2f}x"

    for r in rows:
        lines.append(
            f"| {r['size']} | {r['n_params'] / 1e6:.0f}M | {ms(r['gpt2-onnx'])} | {ms(r['llama.cpp-q8_0'])} | "
            f"{ratio(r['llama.cpp-q8_0'], r['gpt2-onnx'])} | {ms(r['gpt2-onnx-fp32'])} | {ms(r['llama.cpp-f32'])} | "
            f"{ratio(r['llama.cpp-f32'], r['gpt2-onnx-fp32'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"gpt2-onnx": ("ours int8", "C0", "-"), "llama.cpp-q8_0": ("llama.cpp q8_0", "C1", "-"),
              "gpt2-onnx-fp32": ("ours fp32", "C0", "--"), "llama.cpp-f32": ("llama.cpp f32", "C1", "--")}  # fmt: skip
    for runner, (label, color, line) in styles.items():
        points = [(r["n_params"] / 1e6, r[runner]) for r in rows if r[runner] is not None]
        if points:
            ax.plot(*zip(*points), line, color=color, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("decode ms/token (batch 1, lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl", help="comma-separated sizes")
    p.add_argument("--out", type=Path, required=True, help="folder for each size's run and the summary")
    p.add_argument("--models-dir", type=Path, default=Path("models"), help="where exported models are kept")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per runner (after one warm-up)")
    p.add_argument(
        "--kv-cache", default="shared", help="our cache layout (shared: export's default, fastest)"
    )
    args = p.parse_args(argv)
    results = {}
    for size in args.sizes.split(","):
        size = canonical_size(size)
        results[size] = bench(
            size, args.out / size, args.models_dir, args.new_tokens, args.repeats, args.kv_cache
        )
    rows = rows_of(results)
    machine = next(iter(results.values()))["machine"]
    (args.out / "sizes.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (args.out / "sizes.md").write_text(table(rows, machine))
    plot(rows, args.out / "decode_ms_by_size.png")
    print(table(rows, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
