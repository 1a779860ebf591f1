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

from gpt2onnx.engine.contract import DTYPES, Manifest, UserError
from gpt2onnx.engine.model_folder import read_manifest

from . import peers
from .machine import bandwidth_method, machine_info, read_bandwidth_gbs
from .measure import summarize
from .peers import PEERS
from .reference import write_hf_reference

log = logging.getLogger(__name__)
HF_RUNNERS = ("transformers-eager", "optimum")
ONNX_LOOPS = ("ort-plain-loop", "naive-no-cache")  # plain loops over our graph, with the concat cache
# The default baselines; a peer (llama.cpp, CTranslate2) runs when its venv exists, else is skipped.
ALL_BASELINES = ("transformers-eager", "optimum", *ONNX_LOOPS, *PEERS)
# Ours at another dtype, exported from the same weights with the same cache: "gpt2-onnx-int4"...
OUR_DTYPES = {f"gpt2-onnx-{d}": d for d in DTYPES}
# What each of ours beside the model under test is exported as, (dtype, int8 kernel): those at
# another dtype (int8 with its default kernel), and "gpt2-onnx-int8-blocks", int8 with MatMulNBits
# (contract.INT8_KERNELS), to compare the two kernels in one run.
OUR_TWINS = {**{name: (d, "rows" if d == "int8" else None) for name, d in OUR_DTYPES.items()},
             "gpt2-onnx-int8-blocks": ("int8", "blocks")}  # fmt: skip
# On request: ours without CUDA graphs and device sampling (GPU runs), at other dtypes and kernels.
EXTRA_BASELINES = ("gpt2-onnx-eager", *OUR_TWINS)
OURS = ("gpt2-onnx", "gpt2-onnx-eager", *OUR_TWINS)  # our engine's runners: if one fails, the benchmark fails
WORKER = Path(__file__).resolve().parent / "worker.py"
WEIGHT_BYTES = {
    "fp32": 4,
    "fp16": 2,
    "int8": 1 + 4 / 128,
    "int4": 0.5 + 4.5 / 64,  # int4: a fp32 scale and a 4-bit zero point per 64 weights
}  # int8: one fp32 scale per 128 weights. The peers report their own (their file's size).
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
    rounds: int = 1  # the whole runner sequence this many times, alternating; medians over all runs
    optimum_python: str | None = None  # a Python with optimum-onnx installed (its own environment)
    seed: int = 0  # prompts

    def __post_init__(self) -> None:
        if min(self.new_tokens) < 2:
            raise ValueError(
                "--new-tokens must be >= 2: decode speed is measured over the steps after the first token"
            )
        if self.rounds < 1:
            raise ValueError("--rounds must be >= 1")

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


def export_twin(
    manifest: Manifest, model_folder: Path, out: Path, dtype: str, kv_cache: str, int8_kernel: str = "rows"
) -> Path:
    """The same weights exported again with another dtype or cache layout: the concat graph for
    the ONNX loops when the model under test has the shared cache (they drive the concat
    contract), and ours at other dtypes or int8 kernels (OUR_TWINS)."""
    from gpt2onnx.export.exporter import ExportConfig, export

    src = manifest.source
    random_size = src.checkpoint.removeprefix("random-init:") if src.random_init else None
    log.info("exporting the same weights as %s with the %s cache into %s", dtype, kv_cache, out.name)
    export(
        ExportConfig(
            output=out,
            model=None if src.random_init else src.checkpoint,
            random_init=random_size,
            seed=src.seed or 0,
            dtype=dtype,
            tokenizer=model_folder / manifest.tokenizer_file,
            optimize=manifest.optimized or kv_cache == "shared",
            kv_cache=kv_cache,
            int8_kernel=int8_kernel,
        )
    )
    return out


def onnx_folders(cfg: BenchConfig, manifest: Manifest, workdir: Path) -> dict[str, Path]:
    """The model folder each ONNX runner loads."""
    ours = cfg.model_folder.resolve()
    folders = {"gpt2-onnx": ours, "gpt2-onnx-eager": ours}
    # an int8 folder from before int8_kernel was recorded is MatMulNBits
    under_test = (manifest.dtype, manifest.int8_kernel or ("blocks" if manifest.dtype == "int8" else None))
    for runner, (dtype, kernel) in OUR_TWINS.items():
        if runner in cfg.baselines:
            folders[runner] = ours if (dtype, kernel) == under_test else export_twin(
                manifest, cfg.model_folder, workdir / runner, dtype, manifest.kv_cache, kernel or "rows")  # fmt: skip
    loops = [b for b in cfg.baselines if b in ONNX_LOOPS]
    if loops:
        concat = ours
        if manifest.kv_cache == "shared":
            concat = export_twin(
                manifest, cfg.model_folder, workdir / "concat-graph", manifest.dtype, "concat"
            )
        folders |= dict.fromkeys(loops, concat)
    return folders


def runner_python(runner: str, optimum_python: str | None, on_gpu: bool) -> tuple[str | None, str | None]:
    """(the Python that runs it, None) or (None, why it is skipped)."""
    if runner in PEERS and on_gpu:
        return (
            None,
            f"{PEERS[runner].engine} is set up here as a CPU build; it is compared on the CPU (--provider cpu)",
        )
    if runner == "optimum":
        if optimum_python is None:
            return (
                None,
                "optimum-onnx is not installed; run .ci/setup-optimum (its own venv) or pass --optimum-python",
            )
        return optimum_python, None
    if runner in PEERS:
        engine = PEERS[runner].engine
        python = peers.find_python(engine)
        return (python, None) if python else (None, peers.skipped_reason(engine))
    return sys.executable, None


def max_batch_of(runner: str, cfg: BenchConfig) -> int:
    if runner == "naive-no-cache":
        return cfg.naive_max_batch
    if runner in PEERS:
        return peers.MAX_BATCH.get(PEERS[runner].engine, max(cfg.batches))
    return max(cfg.batches)


def precision_of(runner: str, data: dict, manifest: Manifest) -> str:
    """The precision its weights run at, in our dtype names, to compare like with like."""
    if runner in PEERS:
        return PEERS[runner].ours
    if runner in OUR_TWINS:
        return OUR_TWINS[runner][0]
    if runner in HF_RUNNERS:  # fp32 weights; transformers runs an fp16 model's dtype on the GPU
        fp16 = runner == "transformers-eager" and data.get("device") == "cuda" and manifest.dtype == "fp16"
        return "fp16" if fp16 else "fp32"
    return manifest.dtype


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
            "int8_kernel": manifest.int8_kernel,
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
    device = "cuda" if results["machine"]["gpu"] and cfg.provider != "cpu" else "cpu"
    results["machine"]["read_bandwidth_gbs"] = read_bandwidth_gbs(device)
    results["machine"]["bandwidth_method"] = bandwidth_method(device)
    runners = ("gpt2-onnx", *cfg.baselines)
    with tempfile.TemporaryDirectory(prefix="gpt2-onnx-bench-") as tmp:
        workdir = Path(tmp)
        hf_folder = workdir / "hf-reference"
        if any(b in HF_RUNNERS for b in cfg.baselines):
            log.info("writing the transformers reference folder with the same weights")
            write_hf_reference(manifest, hf_folder)
        folders = onnx_folders(cfg, manifest, workdir)
        pythons = {}
        for runner in runners:
            pythons[runner], skipped = runner_python(runner, optimum_python, device == "cuda")
            if skipped:
                results["runners"][runner] = {"runner": runner, "skipped": skipped}
                log.warning("%s skipped: %s", runner, skipped)
        peer_spec = prepare_peers(
            cfg, [r for r in runners if r in PEERS and pythons[r]], prompts, workdir, results
        )
        for round_ in range(cfg.rounds):
            for runner in runners:
                if not pythons[runner] or "error" in results["runners"].get(runner, {}):
                    continue
                configs = [x for x in cfg.configs if x[0] <= max_batch_of(runner, cfg)]
                log.info("running %s over %d configurations%s", runner, len(configs),
                         f" (round {round_ + 1} of {cfg.rounds})" if cfg.rounds > 1 else "")  # fmt: skip
                spec = {
                    "runner": runner,
                    "model_folder": str(folders.get(runner, "")),
                    "hf_folder": str(hf_folder),
                    "provider": cfg.provider,
                    "dtype": manifest.dtype,
                    "max_batch": max(cfg.batches),
                    "configs": configs,
                    "prompts": prompts.tolist(),
                    "warmup": cfg.warmup,
                    "repeats": cfg.repeats,
                }
                if runner in PEERS:
                    spec |= peer_spec | {"peer": asdict(PEERS[runner])}
                data = run_worker(pythons[runner], spec, workdir)
                if "error" in data:
                    results["runners"][runner] = data
                    record_failure(results, runner, data["error"])
                    if runner == "gpt2-onnx":
                        return add_summaries(results, manifest)  # nothing to compare the baselines with
                    continue
                add_round(results["runners"], runner, data)
    return add_summaries(results, manifest)


def prepare_peers(
    cfg: BenchConfig, names: list[str], prompts: np.ndarray, workdir: Path, results: dict
) -> dict:
    """peers.prepare once for all peers; if it fails, each of them is a failed row with its reason."""
    if not names:
        return {}
    try:
        return peers.prepare(names, cfg.model_folder.resolve(), prompts, workdir)
    except Exception as e:  # recorded for each peer, as a worker's error would be
        last = (str(e).strip().splitlines() or ["(no message)"])[-1][:300]
        reason = f"preparing the peers' models failed: {type(e).__name__}: {last}"
        for name in names:
            results["runners"][name] = {"runner": name, "error": reason}
            record_failure(results, name, reason)
        return {}


def add_round(runners: dict, runner: str, data: dict) -> None:
    """The first round's results as they are; a later round's timed runs join each configuration's."""
    if runner not in runners:
        runners[runner] = data | {"rounds": 1}
        return
    kept = runners[runner]
    for old, new in zip(kept["results"], data["results"]):
        old["runs"] += new["runs"]
    kept["rounds"] += 1
    kept["peak_rss_mb"] = max(kept["peak_rss_mb"], data["peak_rss_mb"])


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
    """Medians, ratios to ours (the model under test, and ours at the runner's precision when it
    ran), token agreement and the fraction of the bandwidth floor. Without results of ours (it
    failed), only the medians and floors."""
    c = manifest.config
    bw = results["machine"]["read_bandwidth_gbs"] * 1e9
    key = lambda r: (r["batch"], r["prompt_len"], r["new_tokens"])  # noqa: E731
    for runner, data in results["runners"].items():
        if "results" not in data:
            continue
        data["precision"] = precision = precision_of(runner, data, manifest)
        weight_bytes = data.get("weight_bytes") or c.n_params * WEIGHT_BYTES[precision]
        kv_bytes = data.get("kv_bytes") or KV_BYTES[precision]
        for r in data["results"]:
            for metric in ("ttft_ms", "decode_ms_per_token", "tokens_per_s", "python_overhead_ms"):
                values = [run[metric] for run in r["runs"] if run[metric] is not None]
                if values:
                    r[metric] = summarize(values)
            context = r["prompt_len"] + r["new_tokens"] / 2
            r["bytes_per_step"] = weight_bytes + 2 * c.n_layer * r["batch"] * context * c.n_embd * kv_bytes
            r["bandwidth_floor_ms"] = 1e3 * r["bytes_per_step"] / bw
            r["fraction_of_floor"] = r["bandwidth_floor_ms"] / r["decode_ms_per_token"]["median"]
    by_config = {
        name: {key(r): r for r in data.get("results", [])} for name, data in results["runners"].items()
    }
    ours = by_config.get("gpt2-onnx", {})
    ours_at = {data["precision"]: name for name, data in results["runners"].items()
               if name in ("gpt2-onnx", *OUR_DTYPES) and "results" in data}  # fmt: skip
    for runner, data in results["runners"].items():
        for r in data.get("results", []):
            if key(r) in ours:
                mine = ours[key(r)]
                r["decode_vs_ours"] = (
                    r["decode_ms_per_token"]["median"] / mine["decode_ms_per_token"]["median"]
                )
                r["tokens_per_s_ours_over_this"] = (
                    mine["tokens_per_s"]["median"] / r["tokens_per_s"]["median"]
                )
                r["same_tokens_as_ours"] = r["tokens"] == mine["tokens"]
                same = np.asarray(r["tokens"]) == np.asarray(mine["tokens"])
                r["token_agreement"] = float(np.mean(same))  # int8 drifts from fp32
            twin = ours_at.get(data["precision"])
            if twin and twin != runner and runner not in OURS and key(r) in by_config[twin]:
                mine = by_config[twin][key(r)]
                r["ours_at_precision"] = twin
                r["decode_vs_ours_at_precision"] = (
                    r["decode_ms_per_token"]["median"] / mine["decode_ms_per_token"]["median"]
                )
                same = np.asarray(r["tokens"]) == np.asarray(mine["tokens"])
                r["token_agreement_at_precision"] = float(np.mean(same))
    return results
