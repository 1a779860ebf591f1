"""The benchmark orchestrator: one sweep, every runner in its own process, same weights,
same prompts, same greedy settings; then ratios to ours, JSON, a Markdown table and plots.

Same weights: the baselines load a Hugging Face folder written from the exact state dict the
model folder was exported from (regenerated from the seed for random-init, re-read and
sha256-checked for checkpoints), and every baseline's greedy tokens are compared with ours.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gpt2onnx.engine.contract import Manifest, UserError
from gpt2onnx.engine.model_folder import read_manifest

from .machine import bandwidth_method, machine_info, read_bandwidth_gbs
from .measure import summarize

log = logging.getLogger(__name__)
ORT_RUNNERS = ("gpt2-onnx", "gpt2-onnx-eager", "ort-plain-loop", "naive-no-cache")
HF_RUNNERS = ("transformers-eager", "optimum")
ALL_BASELINES = ("transformers-eager", "optimum", "ort-plain-loop", "naive-no-cache")
EXTRA_BASELINES = ("gpt2-onnx-eager",)  # on request: ours without CUDA graphs and device sampling (GPU runs)
OURS = ("gpt2-onnx", "gpt2-onnx-eager")  # our engine's runners: if one fails, the benchmark fails
WORKER = Path(__file__).resolve().parent / "worker.py"
WEIGHT_BYTES = {
    "fp32": 4,
    "fp16": 2,
    "int8": 1 + 4 / 128,
    "int4": 0.5 + 4.5 / 64,  # int4: a fp32 scale and a 4-bit zero point per 64 weights
}  # int8: one fp32 scale per 128 weights
KV_BYTES = {"fp32": 4, "fp16": 2, "int8": 4, "int4": 4}
SIGNALS = {s.value: s.name for s in signal.Signals}  # a worker's negative exit code -> SIGKILL, SIGSEGV, ...


class BenchError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class BenchConfig:
    model_folder: Path
    out: Path = Path("bench-results")
    provider: str = "auto"
    batches: tuple[int, ...] = (1, 2, 4, 8)
    prompt_lens: tuple[int, ...] = (32, 256)
    new_tokens: tuple[int, ...] = (128,)
    warmup: int = 1
    repeats: int = 5
    baselines: tuple[str, ...] = ALL_BASELINES
    naive_max_batch: int = 1  # the O(n^2) loop is slow; run it only at small batches
    optimum_python: str | None = None  # a Python with optimum-onnx installed (its own environment)
    seed: int = 0  # prompts

    def __post_init__(self) -> None:
        if min(self.new_tokens) < 2:
            raise ValueError(
                "--new-tokens must be >= 2: decode speed is measured over the steps after the first token"
            )

    @property
    def configs(self) -> list[tuple[int, int, int]]:
        return list(itertools.product(self.batches, self.prompt_lens, self.new_tokens))


QUICK = dict(batches=(1,), prompt_lens=(32,), new_tokens=(128,), warmup=1, repeats=3)  # the targets' setting


def find_optimum_python(explicit: str | None) -> str | None:
    """Where Optimum can run: an explicit Python, this one, or the repo's .venv-optimum."""
    candidates = (
        [explicit] if explicit else [sys.executable, str(Path(".venv-optimum/bin/python").absolute())]
    )  # absolute, not resolve: a venv python is a symlink
    for python in candidates:
        if python and Path(python).exists():
            ok = (
                subprocess.run([python, "-c", "import optimum.onnxruntime"], capture_output=True).returncode
                == 0
            )
            if ok:
                return python
    return None


def write_hf_reference(manifest: Manifest, folder: Path) -> None:
    """A transformers folder with the exact weights the model folder was exported from."""
    from safetensors.torch import save_file

    from gpt2onnx.export.checkpoint import (
        CheckpointError,
        load_checkpoint,
        random_state_dict,
        to_hf_checkpoint,
    )

    src = manifest.source
    if src.random_init:
        state = random_state_dict(manifest.config, src.seed)
    else:
        ckpt = load_checkpoint(src.checkpoint)
        if ckpt.source.weights_sha256 != src.weights_sha256:
            raise CheckpointError(
                f"{src.checkpoint} changed since the model folder was exported (sha256 differs); re-export before benchmarking"
            )
        state = ckpt.state_dict
    hf_config, hf_state = to_hf_checkpoint(manifest.config, state)
    hf_state.pop("lm_head.weight")  # tied to wte; safetensors refuses shared tensors
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config))
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(folder / "model.safetensors"))


def concat_twin(manifest: Manifest, model_folder: Path, workdir: Path) -> Path:
    """The concat-cache graph of the same weights and dtype, for the ONNX baselines
    when the model under test is the shared-cache graph: they drive the concat contract."""
    from gpt2onnx.export.exporter import ExportConfig, export

    src = manifest.source
    random_size = src.checkpoint.removeprefix("random-init:") if src.random_init else None
    out = workdir / "concat-graph"
    log.info("exporting the concat cache graph of the same weights for the ONNX baselines")
    export(
        ExportConfig(
            output=out,
            model=None if src.random_init else src.checkpoint,
            random_init=random_size,
            seed=src.seed or 0,
            dtype=manifest.dtype,
            tokenizer=model_folder / manifest.tokenizer_file,
        )
    )
    return out


def run_worker(python: str, spec: dict, workdir: Path) -> dict:
    """One runner in its own process. Its stderr (progress, a traceback) is passed through as it
    comes, and its last line kept: a runner that fails comes back as {"runner", "error"} with that
    line, so the failure says what went wrong and not only that something did."""
    path, out_path = workdir / f"{spec['runner']}.json", workdir / f"{spec['runner']}.out.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    last = b""
    with out_path.open("w") as stdout:
        proc = subprocess.Popen(
            [python, str(WORKER), str(path)], stdout=stdout, stderr=subprocess.PIPE, env=env
        )
        for line in proc.stderr:
            os.write(2, line)  # to the terminal as it comes, as an inherited stderr would
            last = line.strip() or last
        code = proc.wait()
    last = last.decode(errors="replace")
    lines = out_path.read_text().strip().splitlines()
    if code != 0 or not lines:
        how = f"killed by {SIGNALS.get(-code, f'signal {-code}')}" if code < 0 else f"exit {code}"
        return {"runner": spec["runner"], "error": f"{how}: {last or 'no error output'}"}
    return json.loads(lines[-1])


def run_bench(cfg: BenchConfig) -> dict:
    """The whole sweep. A runner that fails does not raise: it is recorded in results["failures"]
    (and results["ok"] is False when it was ours), so what ran can still be written; the caller
    turns failure_line(results) into the error. If gpt2-onnx itself fails, no baseline runs."""
    manifest = read_manifest(cfg.model_folder)
    c = manifest.config
    gen = np.random.default_rng(cfg.seed)
    width = max(cfg.prompt_lens)
    prompts = gen.integers(0, c.vocab_size, (max(cfg.batches), width), dtype=np.int64)
    prompts[prompts == c.eos_token_id] = 0
    if width + max(cfg.new_tokens) > c.n_positions:
        raise ValueError(
            f"prompt {width} + new {max(cfg.new_tokens)} tokens exceed the model's {c.n_positions}-token context"
        )
    optimum_python = find_optimum_python(cfg.optimum_python) if "optimum" in cfg.baselines else None
    results: dict = {
        "machine": machine_info(),
        "model": {
            "folder": str(cfg.model_folder),
            "checkpoint": manifest.source.checkpoint,
            "random_init": manifest.source.random_init,
            "seed": manifest.source.seed,
            "dtype": manifest.dtype,
            "kv_cache": manifest.kv_cache,
            "optimized": manifest.optimized,
            "n_params": c.n_params,
            "n_layer": c.n_layer,
            "n_embd": c.n_embd,
        },
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "configs": cfg.configs,
            "decoding": "greedy, EOS ignored: every runner generates exactly new_tokens",
        },
        "runners": {},
        "ok": True,  # False when one of OURS failed: the benchmark failed
        "failures": [],  # {"runner", "reason", "ours"} for every runner that failed
    }
    log.info("measuring memory bandwidth")
    device_for_bw = "cuda" if results["machine"]["gpu"] and cfg.provider != "cpu" else "cpu"
    results["machine"]["read_bandwidth_gbs"] = read_bandwidth_gbs(device_for_bw)
    results["machine"]["bandwidth_method"] = bandwidth_method(device_for_bw)
    with tempfile.TemporaryDirectory(prefix="gpt2-onnx-bench-") as tmp:
        workdir = Path(tmp)
        hf_folder = workdir / "hf-reference"
        if any(b in HF_RUNNERS for b in cfg.baselines):
            log.info("writing the transformers reference folder with the same weights")
            write_hf_reference(manifest, hf_folder)
        onnx_baseline_folder = cfg.model_folder.resolve()
        if manifest.kv_cache == "shared" and any(
            b in ("ort-plain-loop", "naive-no-cache") for b in cfg.baselines
        ):
            onnx_baseline_folder = concat_twin(manifest, cfg.model_folder, workdir)
        for runner in ("gpt2-onnx", *cfg.baselines):
            configs = [x for x in cfg.configs if runner != "naive-no-cache" or x[0] <= cfg.naive_max_batch]
            python = sys.executable
            if runner == "optimum":
                if optimum_python is None:
                    results["runners"][runner] = {
                        "runner": runner,
                        "skipped": "optimum-onnx is not installed; run .ci/setup-optimum (its own venv) or pass --optimum-python",
                    }
                    log.warning(
                        "Optimum skipped: not installed (.ci/setup-optimum installs it in .venv-optimum)"
                    )
                    continue
                python = optimum_python
            log.info("running %s over %d configurations", runner, len(configs))
            folder = cfg.model_folder.resolve() if runner.startswith("gpt2-onnx") else onnx_baseline_folder
            spec = {
                "runner": runner,
                "model_folder": str(folder),
                "hf_folder": str(hf_folder),
                "provider": cfg.provider,
                "dtype": manifest.dtype,
                "max_batch": max(cfg.batches),
                "configs": configs,
                "prompts": prompts.tolist(),
                "warmup": cfg.warmup,
                "repeats": cfg.repeats,
            }
            results["runners"][runner] = data = run_worker(python, spec, workdir)
            if "error" in data:
                record_failure(results, runner, data["error"])
                if runner == "gpt2-onnx":
                    break  # nothing to compare the baselines with
    return add_summaries(results, manifest)


def record_failure(results: dict, runner: str, reason: str) -> None:
    """A failed runner is recorded in the results, never only logged: ours fails the benchmark
    (see failure_line), a baseline stays a row left out, with its reason."""
    ours = runner in OURS
    results["failures"].append({"runner": runner, "reason": reason, "ours": ours})
    results["ok"] = results["ok"] and not ours
    log.warning("%s failed%s: %s", runner, "" if ours else " and is left out of the results", reason)


def failure_line(results: dict) -> str | None:
    """The one-line error for a benchmark whose own engine failed; None when ours ran."""
    mine = [f for f in results["failures"] if f["ours"]]
    if not mine:
        return None
    after = "; the baselines did not run" if mine[0]["runner"] == "gpt2-onnx" else ""
    return "; ".join(f"{f['runner']} failed: {f['reason']}" for f in mine) + after


def add_summaries(results: dict, manifest: Manifest) -> dict:
    """Medians, ratios to ours, token agreement and the fraction of the bandwidth floor.
    Without results of ours (it failed), only the medians."""
    c = manifest.config
    ours_results = results["runners"]["gpt2-onnx"].get("results", [])
    ours = {(r["batch"], r["prompt_len"], r["new_tokens"]): r for r in ours_results}
    bw = results["machine"]["read_bandwidth_gbs"] * 1e9
    w_bytes, kv_bytes = WEIGHT_BYTES[manifest.dtype], KV_BYTES[manifest.dtype]
    for data in results["runners"].values():
        for r in data.get("results", []):
            key = (r["batch"], r["prompt_len"], r["new_tokens"])
            for metric in ("ttft_ms", "decode_ms_per_token", "tokens_per_s", "python_overhead_ms"):
                values = [run[metric] for run in r["runs"] if run[metric] is not None]
                if values:
                    r[metric] = summarize(values)
            context = r["prompt_len"] + r["new_tokens"] / 2
            step_bytes = c.n_params * w_bytes + 2 * c.n_layer * r["batch"] * context * c.n_embd * kv_bytes
            r["bytes_per_step"] = step_bytes
            r["bandwidth_floor_ms"] = 1e3 * step_bytes / bw
            r["fraction_of_floor"] = r["bandwidth_floor_ms"] / r["decode_ms_per_token"]["median"]
            if key not in ours:
                continue
            mine = ours[key]
            r["decode_vs_ours"] = r["decode_ms_per_token"]["median"] / mine["decode_ms_per_token"]["median"]
            r["tokens_per_s_ours_over_this"] = mine["tokens_per_s"]["median"] / r["tokens_per_s"]["median"]
            r["same_tokens_as_ours"] = r["tokens"] == mine["tokens"]
            same = np.asarray(r["tokens"]) == np.asarray(mine["tokens"])
            r["token_agreement"] = float(np.mean(same))  # int8 drifts from fp32
    return results
