"""What a GPU benchmark must not do: die before any runner (the bandwidth probe's model over protobuf's
2 GB limit), or look green without our engine in it (a failed or CPU-fallen-back runner only logged).
The failures are made in the worker process by a wrapper script around the real worker."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest

from gpt2onnx.benchmarks import bench, machine
from gpt2onnx.benchmarks.ort_runners import EngineRunner
from gpt2onnx.cli import main
from gpt2onnx.engine.cuda_graphs import GraphRunner

PROTOBUF_LIMIT = 2**31  # bytes: protobuf cannot serialize a message this large
CUDA_ERROR = "CUDA failure 700: an illegal memory access was encountered"


# -- the bandwidth probe ---------------------------------------------------------------------------


def test_gpu_probe_model_streams_2_gib_yet_serializes_far_under_the_limit():
    k, n = machine.probe_shape(machine.BANDWIDTH_MIB["cuda"])
    assert k * n * 4 == 2**31, "the GPU probe must still stream 2 GiB per run"
    model = machine.probe_model(k, n)
    assert not model.graph.initializer, "a weight in the graph puts the model over protobuf's limit"
    assert model.ByteSize() < 2**20 and len(model.SerializeToString()) < 2**20
    assert "2048 MiB" in machine.bandwidth_method("cuda")


def test_gpu_probe_hands_onnxruntime_a_small_model_before_any_weight_is_made(monkeypatch):
    """The real read_bandwidth_gbs("cuda") path up to the session; the old code raised EncodeError here."""
    seen = {}

    class Stop(Exception):
        pass

    def create_session(model, device, threads):
        seen["model"], seen["device"] = model, device
        raise Stop

    monkeypatch.setattr("gpt2onnx.engine.runtime.create_session", create_session)
    with pytest.raises(Stop):
        machine.read_bandwidth_gbs("cuda")
    assert seen["device"] == "cuda" and len(seen["model"]) < PROTOBUF_LIMIT // 1024
    graph = onnx.load_from_string(seen["model"]).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["w"] == [1024, 524288], "the weight is a graph input of the full 2 GiB size"


def test_probe_runs_on_the_cpu_with_its_weight_bound_as_an_input():
    assert machine.read_bandwidth_gbs("cpu", repeats=2, mib=4) > 0


# -- failed runners --------------------------------------------------------------------------------


def wrap_worker(monkeypatch, tmp_path: Path, fail: tuple[str, ...] = (), fall_back: bool = False) -> None:
    """Point the orchestrator at a worker that fails for the runners in `fail` (a CUDA-like error as
    they load) and, with fall_back, builds every runner on the CPU whatever the provider asked for."""
    script = tmp_path / "wrapped_worker.py"
    script.write_text(f"""
import json, sys
sys.path.insert(0, {str(bench.WORKER.parent)!r})
import worker
spec = json.loads(open(sys.argv[1]).read())
real = worker.make_runner
if spec["runner"] in {list(fail)!r}:
    def make_runner(spec):
        print("loading " + spec["runner"], file=sys.stderr)
        raise RuntimeError({CUDA_ERROR!r})
    worker.make_runner = make_runner
elif {fall_back!r}:
    worker.make_runner = lambda spec: real({{**spec, "provider": "cpu"}})
worker.run()
""")
    monkeypatch.setattr(bench, "WORKER", script)
    small_probe = lambda device: machine.read_bandwidth_gbs(device, repeats=2, mib=8)  # noqa: E731
    monkeypatch.setattr(bench, "read_bandwidth_gbs", small_probe)


def run_cli(model: Path, out: Path, baselines: str, capsys, provider: str = "cpu") -> tuple[int, str, dict]:
    args = ["--quiet", "bench", "--model", str(model), "--out", str(out), "--provider", provider,
            "--batches", "1", "--prompt-lens", "4", "--new-tokens", "3", "--warmup", "0", "--repeats", "1",
            "--baselines", baselines]  # fmt: skip
    code = main(args)
    err = capsys.readouterr().err
    return code, err.strip().splitlines()[-1], json.loads((out / "results.json").read_text())


def test_our_engine_failing_fails_the_benchmark_with_the_workers_error(tiny_fp32, tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    wrap_worker(monkeypatch, tmp_path, fail=("gpt2-onnx",))
    code, last, results = run_cli(tiny_fp32, tmp_path / "out", "ort-plain-loop", capsys)
    assert code != 0
    assert last.startswith("gpt2-onnx: error: gpt2-onnx failed: exit 1: RuntimeError: " + CUDA_ERROR), last
    assert results["ok"] is False
    reason = f"exit 1: RuntimeError: {CUDA_ERROR}"
    assert results["failures"] == [{"runner": "gpt2-onnx", "reason": reason, "ours": True}]
    assert "ort-plain-loop" not in results["runners"], (
        "no baseline runs when there is nothing to compare it with"
    )
    assert "FAILED: gpt2-onnx" in (tmp_path / "out" / "results.md").read_text()


def test_our_eager_runner_failing_fails_the_benchmark_after_the_baselines(tiny_fp32, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    wrap_worker(monkeypatch, tmp_path, fail=("gpt2-onnx-eager",))
    code, last, results = run_cli(tiny_fp32, tmp_path / "out", "gpt2-onnx-eager,ort-plain-loop", capsys)
    assert code != 0 and "gpt2-onnx-eager failed: exit 1: RuntimeError: " + CUDA_ERROR in last, last
    assert results["ok"] is False and [f["runner"] for f in results["failures"]] == ["gpt2-onnx-eager"]
    assert results["runners"]["gpt2-onnx"]["results"]
    assert results["runners"]["ort-plain-loop"]["results"][0]["same_tokens_as_ours"]


def test_a_failed_baseline_is_a_recorded_row_and_the_benchmark_passes(tiny_fp32, tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    wrap_worker(monkeypatch, tmp_path, fail=("ort-plain-loop",))
    code, _, results = run_cli(tiny_fp32, tmp_path / "out", "ort-plain-loop,naive-no-cache", capsys)
    assert code == 0 and results["ok"] is True
    reason = f"exit 1: RuntimeError: {CUDA_ERROR}"
    assert results["failures"] == [{"runner": "ort-plain-loop", "reason": reason, "ours": False}]
    assert results["runners"]["ort-plain-loop"] == {"runner": "ort-plain-loop", "error": reason}
    assert results["runners"]["naive-no-cache"]["results"], "the baselines after a failed one still run"
    ours = results["runners"]["gpt2-onnx"]
    assert (
        ours["cuda_graphs"] is False and ours["cuda_graphs_fallback"] is None
    )  # on the CPU: no graphs, no fallback
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"| ort-plain-loop | | | | | | | | | | | | FAILED, left out: {reason} |" in table


def test_a_session_that_fell_back_to_the_cpu_fails_a_cuda_benchmark(tiny_fp32, tmp_path, monkeypatch, capsys):
    wrap_worker(monkeypatch, tmp_path, fall_back=True)
    code, last, results = run_cli(tiny_fp32, tmp_path / "out", "ort-plain-loop", capsys, provider="cuda")
    expected = (
        "gpt2-onnx failed: exit 1: FellBackError: --provider cuda was asked for but gpt2-onnx runs on cpu"
    )
    assert code != 0 and expected in last, last
    assert results["failures"][0]["ours"] and "fell back to the CPU" in results["failures"][0]["reason"]


def test_a_worker_killed_by_a_signal_says_so_with_its_last_line(tmp_path, monkeypatch):
    script = tmp_path / "killed.py"
    script.write_text("import os, signal, sys\n"
                      "print('allocating the cache', file=sys.stderr, flush=True)\n"
                      "os.kill(os.getpid(), signal.SIGKILL)\n")  # fmt: skip
    monkeypatch.setattr(bench, "WORKER", script)
    data = bench.run_worker(sys.executable, {"runner": "gpt2-onnx"}, tmp_path)
    assert data == {"runner": "gpt2-onnx", "error": "killed by SIGKILL: allocating the cache"}


# -- what the engine's runner reports about CUDA graphs --------------------------------------------


def test_engine_runner_reports_whether_cuda_graphs_really_ran():
    graphs = GraphRunner((1, 2), {"decode": True, "sampling": True})
    runner = EngineRunner(SimpleNamespace(session=SimpleNamespace(graphs=graphs)))
    assert runner.graph_state() == {"cuda_graphs": True, "cuda_graphs_fallback": None}
    graphs.turn_off("decode", "capture failed at the first replay")
    state = runner.graph_state()
    assert state == {"cuda_graphs": False, "cuda_graphs_fallback": "capture failed at the first replay"}
