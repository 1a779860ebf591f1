"""`gpt2-onnx bench-serve`: the load benchmark (benchmarks/load.py) over the runners a user would
compare, side by side in one run on the same seeded workload:

- `continuous`: `gpt2-onnx serve --max-batch B` (continuous batching), a subprocess;
- `batch1`: the same server with --max-batch 1 (one request at a time);
- `static`: static batches of B through `Engine.generate`, in this process;
- `llamacpp`: llama.cpp's OpenAI-compatible server (llama-cpp-python) on the same weights as a
  q8_0 GGUF (.ci/setup-llamacpp); skipped, with the reason, when it is not installed.

Two loads: closed loop with `--clients` clients (each sends its next request when its last one
ended), and open loop with Poisson arrivals at each `--rates` value.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpt2onnx.engine.contract import UserError
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.extras import require
from gpt2onnx.engine.model_folder import read_manifest

from . import llamacpp, load
from .reference import hf_checkpoint
from .report import dtype_label

log = logging.getLogger("gpt2onnx")
RUNNERS = ("continuous", "batch1", "static", "llamacpp")  # the default set
RAY_RUNNERS = ("ray1", "ray2")  # gpt2-onnx serve --ray with 1 or 2 replicas sharing this machine's CPUs
SERVING = re.compile(r"serving .* on (http://\S+)/v1")


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench-serve", parents=parents, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="the load benchmark: our server (continuous batching, max-batch 1), static "
                            "batches, llama.cpp's server, under the same load")  # fmt: skip
    p.add_argument(
        "--model", required=True, type=Path, help="a shared-cache model folder (--kv-cache shared)"
    )
    p.add_argument("--out", type=Path, default=Path("bench-serve-results"), help="output folder")
    p.add_argument(
        "--max-batch", type=int, default=16, help="slots of the continuous server, static batch size"
    )
    p.add_argument("--clients", type=int, default=16, help="closed loop: concurrent clients (0: skip)")
    p.add_argument("--rates", default="2,4", help="open loop: Poisson arrival rates, requests/s ('': skip)")
    p.add_argument("--requests", type=int, default=48, help="requests per load")
    p.add_argument("--prompt-lens", default="16,256", help="prompt length range, tokens")
    p.add_argument("--new-tokens", default="16,256", help="max_tokens range")
    p.add_argument("--runners", default=",".join(RUNNERS),
                   help=f"which runners, comma-separated (also: {', '.join(RAY_RUNNERS)}, the [ray] extra)")  # fmt: skip
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu", help="execution provider")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.set_defaults(run=run)


def span(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def run(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.model)
    vocab = manifest.config.vocab_size
    loads = ([("closed", args.clients)] if args.clients else []) + [
        ("open", float(r)) for r in args.rates.split(",") if r
    ]
    runners = [r for r in args.runners.split(",") if r]
    results = {"model": str(args.model), "dtype": manifest.dtype, "int8_kernel": manifest.int8_kernel, "vocab_size": vocab,
               "max_batch": args.max_batch, "requests": args.requests, "prompt_lens": args.prompt_lens,
               "new_tokens": args.new_tokens, "seed": args.seed, "runs": []}  # fmt: skip
    for runner in runners:
        for kind, level in loads:
            jobs = load.workload(args.requests, level if kind == "open" else 1e9, vocab, args.seed,
                                 span(args.prompt_lens), span(args.new_tokens))  # fmt: skip
            log.info("%s, %s load %s: %d requests", runner, kind, level, len(jobs))
            try:
                got, wall = measure(runner, args, kind, level, jobs)
                row = load.summary(got, wall)
            except RunnerSkipped as e:
                row = {"skipped": str(e)}
            results["runs"].append({"runner": runner, "load": kind, "level": level, **row})
            log.info("  %s", results["runs"][-1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results))
    plot(results, args.out / "throughput.png")
    print(markdown(results))
    return 0


class RunnerSkipped(Exception):
    pass


def measure(runner: str, args, kind: str, level: float, jobs: list[load.Job]):
    if runner == "static":
        engine = Engine.load(args.model, provider=args.provider, max_batch=args.max_batch)
        engine.generate([jobs[0].prompt], max_new_tokens=4, ignore_eos=True)  # warm-up
        if kind == "closed":  # all waiting at once: batches of max_batch, one after the other
            jobs = [load.Job(0.0, j.prompt, j.max_tokens) for j in jobs]
        return load.run_static(engine, jobs, args.max_batch)
    with server(runner, args) as (url, model):
        warm = [load.Job(0.0, jobs[0].prompt[:16], 4)]
        asyncio.run(load.run_server(url, model, warm))
        if kind == "closed":
            return asyncio.run(load.run_server_closed(url, model, jobs, int(level)))
        return asyncio.run(load.run_server(url, model, jobs))


class server:
    """A runner's server as a subprocess on a free 127.0.0.1 port, stopped on exit."""

    def __init__(self, runner: str, args):
        self.runner, self.args = runner, args

    def __enter__(self) -> tuple[str, str]:
        args = self.args
        if self.runner == "llamacpp":
            return self.llama_server()
        batch = 1 if self.runner == "batch1" else args.max_batch
        cmd = [sys.executable, "-m", "gpt2onnx", "serve", "--model", str(args.model), "--port", "0",
               "--max-batch", str(batch), "--max-queue", "100000", "--provider", args.provider,
               "--served-model-name", "gpt2", "--quiet"]  # fmt: skip
        if self.runner in RAY_RUNNERS:  # its own local cluster; the machine's CPUs shared by the replicas
            replicas = int(self.runner[3:])
            cmd[cmd.index("--port") + 1] = str(llamacpp.free_port())  # Ray's proxy takes no port 0
            cmd += [
                "--ray",
                "--replicas",
                str(replicas),
                "--replica-cpus",
                f"{(os.cpu_count() or 1) / replicas:g}",
            ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        for line in self.proc.stderr:
            if found := SERVING.search(line):
                threading_drain(self.proc.stderr)
                return found.group(1), "gpt2"
            if time.monotonic() > deadline:
                break
        self.__exit__()
        raise RuntimeError(f"`{' '.join(cmd)}` did not start")

    def llama_server(self) -> tuple[str, str]:
        """llama.cpp's C++ llama-server (continuous batching, max_batch slots) on the same weights
        as q8_0 GGUF (our int8 is 8-bit weights too), converted once into the output folder."""
        args = self.args  # the GGUF beside the model folder, not among the results (136 MB for 124M)
        folder = args.model.parent / f"{args.model.name}-gguf"
        gguf = folder / "model-q8_0.gguf"
        try:
            if not gguf.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                llamacpp.to_gguf(hf_checkpoint(args.model, folder / "hf"), gguf)
            port = llamacpp.free_port()
            n_ctx = read_manifest(args.model).config.n_positions
            self.proc = llamacpp.start_llama_server(gguf, port, args.max_batch, n_ctx, threads=2)
        except UserError as e:  # llama.cpp is not installed here
            raise RunnerSkipped(str(e)) from None
        llamacpp.wait_ready(port, 180, self.proc)
        return f"http://127.0.0.1:{port}", "gpt2"

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def threading_drain(stream) -> None:
    """Keep reading a subprocess's stderr so that it never blocks on a full pipe."""
    threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()


def markdown(results: dict) -> str:
    dtype = dtype_label(results["dtype"], results.get("int8_kernel"))
    lines = [f"# Load benchmark: {results['model']} ({dtype}), max batch {results['max_batch']}", "",
             "| runner | load | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip

    def f(x) -> str:
        return "" if x is None else f"{x:.1f}"

    for r in results["runs"]:
        load_name = f"{r['level']:g} clients" if r["load"] == "closed" else f"{r['level']:g} req/s"
        if "skipped" in r:
            lines.append(f"| {r['runner']} | {load_name} | | | | | | skipped: {r['skipped']} |")
            continue
        lines.append(f"| {r['runner']} | {load_name} | {f(r['tokens_per_s'])} | {f(r['ttft_ms_p50'])} | "
                     f"{f(r['ttft_ms_p99'])} | {f(r['itl_ms_p50'])} | {f(r['itl_ms_p99'])} | "
                     f"{r['errors'] or ''}{' ' + str(r['first_error'])[:80] if r['errors'] else ''} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    plt = require("matplotlib.pyplot", "bench", "the load benchmark's plot")
    runs = [r for r in results["runs"] if "skipped" not in r]
    loads = sorted({(r["load"], r["level"]) for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for runner in sorted({r["runner"] for r in runs}):
        mine = {(r["load"], r["level"]): r for r in runs if r["runner"] == runner}
        xs = [i for i, key in enumerate(loads) if key in mine]
        axes[0].plot(xs, [mine[loads[i]]["tokens_per_s"] for i in xs], "o-", label=runner)
        axes[1].plot(xs, [mine[loads[i]]["ttft_ms_p50"] or 0 for i in xs], "o-", label=runner)
    for ax, title in zip(axes, ("throughput, tokens/s", "time to first token p50, ms")):
        ax.set_xticks(
            range(len(loads)), [f"{lvl:g} clients" if k == "closed" else f"{lvl:g} req/s" for k, lvl in loads]
        )
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
