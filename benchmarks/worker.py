"""One runner's whole sweep in its own process, so its peak memory is its own.

    python worker.py SPEC.json   ->  one JSON object on stdout, progress on stderr

A runner that fails exits 1 with its traceback and, as the last line of stderr, the error in
one line: the orchestrator records that line. With --provider cuda, a runner whose session
fell back to the CPU fails: its figures would be CPU figures under a GPU label.

Runs as a plain script (not `-m`), so the Hugging Face baselines and the peers (llama.cpp,
CTranslate2) can run under another environment's Python that does not have gpt2onnx installed.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import peak_rss_mb  # noqa: E402
from measure import measure, to_json  # noqa: E402


def make_runner(spec: dict):
    name = spec["runner"]
    if "peer" in spec:  # llama.cpp or CTranslate2, in its own venv
        if spec["peer"]["engine"] == "llama.cpp":
            from llamacpp_runner import llamacpp

            return llamacpp(spec)
        from ctranslate2_runner import ctranslate2

        return ctranslate2(spec)
    if name in ("transformers-eager", "optimum"):
        from hf_runners import RUNNERS

        return RUNNERS[name](
            spec["hf_folder"], spec["provider"], *([spec["dtype"]] if name == "transformers-eager" else [])
        )
    from gpt2onnx.benchmarks.ort_runners import RUNNERS

    if name.startswith("gpt2-onnx"):
        return RUNNERS[name](Path(spec["model_folder"]), spec["provider"], spec["max_batch"])
    return RUNNERS[name](Path(spec["model_folder"]), spec["provider"])


class FellBackError(RuntimeError):
    pass


def check_device(spec: dict, device: str) -> None:
    """Raises FellBackError when the GPU was asked for and the runner's session runs on the CPU."""
    if spec["provider"] == "cuda" and device != "cuda":
        raise FellBackError(f"--provider cuda was asked for but {spec['runner']} runs on {device}: "
                            "its session fell back to the CPU")  # fmt: skip


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    t0 = time.perf_counter()
    runner, device = make_runner(spec)
    load_s = time.perf_counter() - t0
    check_device(spec, device)
    results = []
    for batch, prompt_len, new_tokens in spec["configs"]:
        prompts = np.asarray(spec["prompts"], dtype=np.int64)[:batch, :prompt_len]
        results.append(measure(runner, prompts, new_tokens, spec["warmup"], spec["repeats"], spec["runner"]))
    out = {
        "runner": spec["runner"],
        "device": device,
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "results": to_json(results),
    }
    out.update(getattr(runner, "details", {}))  # a peer's checks, its file size and threads
    if hasattr(runner, "graph_state"):  # ours: whether CUDA graphs really ran, read after the timed runs
        out.update(runner.graph_state())
    if device == "cuda":
        import subprocess

        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
        )
        out["device_memory_mb"] = (
            float(smi.stdout.split()[0]) if smi.returncode == 0 and smi.stdout.strip() else None
        )
    print(json.dumps(out))


def run() -> None:
    """main(), and on an error its traceback, then the error in one line, last: exit 1."""
    try:
        main()
    except Exception as e:  # reported, not swallowed: the orchestrator keeps the last line
        traceback.print_exc()
        message = str(e).strip().splitlines()[0][:300] if str(e).strip() else "(no message)"
        print(f"{type(e).__name__}: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
