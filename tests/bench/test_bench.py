"""The benchmark pipeline end to end on the tiny model: same weights, same tokens, every output written.
(Speed is judged by running the benchmark, never by a timed test.)"""

from __future__ import annotations

import json

import pytest

from gpt2onnx.benchmarks import report
from gpt2onnx.benchmarks.bench import BenchConfig, run_bench
from gpt2onnx.cli import main


def test_bench_runs_side_by_side_on_the_same_weights(tiny_fp32, tmp_path):
    cfg = BenchConfig(
        model_folder=tiny_fp32,
        out=tmp_path,
        provider="cpu",
        batches=(1, 2),
        prompt_lens=(5,),
        new_tokens=(6,),
        warmup=1,
        repeats=2,
        baselines=("transformers-eager", "ort-plain-loop", "naive-no-cache", "optimum"),
        optimum_python="/nonexistent/python",
    )
    results = run_bench(cfg)
    runners = results["runners"]
    assert results["ok"] and results["failures"] == [], "a skipped baseline is not a failure"
    assert "skipped" in runners["optimum"] and "not installed" in runners["optimum"]["skipped"]
    assert runners["gpt2-onnx"]["cuda_graphs"] is False, (
        "ours records whether CUDA graphs ran (not on the CPU)"
    )
    for name in ("gpt2-onnx", "transformers-eager", "ort-plain-loop", "naive-no-cache"):
        for r in runners[name]["results"]:
            assert len(r["runs"]) == 2, "warm-up must be excluded, repeats kept"
            assert r["same_tokens_as_ours"], (
                f"{name} produced other tokens at batch {r['batch']}: not the same weights?"
            )
            assert len(r["tokens"]) == r["batch"] and all(len(t) == 6 for t in r["tokens"])
            assert (
                r["decode_ms_per_token"]["min"]
                <= r["decode_ms_per_token"]["median"]
                <= r["decode_ms_per_token"]["max"]
            )
            assert r["fraction_of_floor"] > 0 and r["bytes_per_step"] > 0
        assert runners[name]["peak_rss_mb"] > 0
    assert [r["batch"] for r in runners["naive-no-cache"]["results"]] == [1]
    ours = runners["gpt2-onnx"]["results"][0]
    assert ours["python_overhead_ms"]["median"] > 0 and ours["decode_vs_ours"] == 1.0
    written = report.write(results, tmp_path)
    assert {p.name for p in written} == {
        "results.json",
        "results.md",
        "throughput_vs_batch.png",
        "ms_per_token_vs_context.png",
    }
    assert json.loads((tmp_path / "results.json").read_text())["machine"]["read_bandwidth_gbs"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "transformers-eager" in table and "Python overhead per decode step" in table
    assert "gpt2-onnx: CUDA graphs off after the timed runs" in table


def test_bench_unknown_baseline_is_one_line(tiny_fp32, capsys):
    code = main(["--quiet", "bench", "--model", str(tiny_fp32), "--baselines", "llama.cpp"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown baselines" in err


def test_bench_needs_two_new_tokens(tiny_fp32, capsys):
    code = main(["--quiet", "bench", "--model", str(tiny_fp32), "--new-tokens", "1"])
    assert code == 2 and "--new-tokens must be >= 2" in capsys.readouterr().err


def test_bench_rejects_a_zero_batch(tiny_fp32, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(tiny_fp32), "--batches", "1,0"])
    assert exc.value.code == 2 and "every value must be >= 1" in capsys.readouterr().err


def test_bench_of_the_shared_cache_runs_onnx_baselines_on_the_concat_twin(tiny_shared, tmp_path):
    cfg = BenchConfig(
        model_folder=tiny_shared,
        out=tmp_path,
        provider="cpu",
        batches=(2,),
        prompt_lens=(4,),
        new_tokens=(5,),
        warmup=1,
        repeats=1,
        baselines=("transformers-eager", "ort-plain-loop"),
    )
    results = run_bench(cfg)
    assert results["model"]["kv_cache"] == "shared"
    for name in ("transformers-eager", "ort-plain-loop"):
        assert results["runners"][name]["results"][0]["same_tokens_as_ours"], name
