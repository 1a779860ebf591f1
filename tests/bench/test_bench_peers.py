"""`gpt2-onnx bench` beside the engines a user would pick instead (llama.cpp, CTranslate2) and
ours at other dtypes: the checks before timing, like-for-like precision ratios, rounds, skips.

The peer runs need their venvs (.ci/setup-llamacpp, .ci/setup-ctranslate2) and are skipped
without them; everything else runs on the tiny models."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO
from gpt2onnx.benchmarks import bench, checks, peers
from gpt2onnx.benchmarks.bench import BenchConfig, add_summaries, run_bench
from gpt2onnx.benchmarks.checks import CheckError
from gpt2onnx.engine.model_folder import read_manifest

HAS = {engine: (REPO / venv.path / "bin" / "python").exists() for engine, venv in peers.VENVS.items()}
SMALL = dict(provider="cpu", batches=(1, 2), prompt_lens=(8,), new_tokens=(6,), warmup=0, repeats=1)


def test_check_same_names_the_first_difference():
    checks.check_same("x", "ids", [1, 2, 3], [1, 2, 3])
    with pytest.raises(CheckError, match=r"x: ids differ from ours at index 1 of 3 \(theirs 9, ours 2\)"):
        checks.check_same("x", "ids", [1, 9, 3], [1, 2, 3])
    with pytest.raises(CheckError, match=r"index 2 of 3 \(theirs \(end\), ours 3\)"):
        checks.check_same("x", "ids", [1, 2], [1, 2, 3])


def test_check_greedy_is_strict_at_full_precision_and_reports_the_prefix_when_quantized():
    assert checks.check_greedy("q", [5, 6, 0, 8], [5, 6, 7, 8], exact=False) == {
        "greedy_prefix_equal_to_transformers": 2,
        "greedy_checked": 4,
    }
    assert checks.check_greedy("f", [5, 6], [5, 6], exact=True)["greedy_prefix_equal_to_transformers"] == 2
    with pytest.raises(CheckError, match="f: greedy token 2 is 0, transformers' is 7"):
        checks.check_greedy("f", [5, 6, 0, 8], [5, 6, 7, 8], exact=True)


def test_ours_at_another_dtype_runs_beside_ours_over_alternating_rounds(tiny_fp32, tmp_path):
    cfg = BenchConfig(model_folder=tiny_fp32, out=tmp_path, baselines=("gpt2-onnx-int8", "gpt2-onnx-fp32"),
                      rounds=2, **SMALL)  # fmt: skip
    results = run_bench(cfg)
    runners = results["runners"]
    assert results["ok"], results["failures"]
    assert {n: runners[n]["precision"] for n in runners} == {
        "gpt2-onnx": "fp32", "gpt2-onnx-int8": "int8", "gpt2-onnx-fp32": "fp32"}  # fmt: skip
    for data in runners.values():
        assert data["rounds"] == 2
        assert [len(r["runs"]) for r in data["results"]] == [2, 2], "each round adds its timed runs"
    fp32, int8 = runners["gpt2-onnx-fp32"]["results"][0], runners["gpt2-onnx-int8"]["results"][0]
    assert fp32["same_tokens_as_ours"], "the fp32 twin is the model under test itself"
    assert int8["bytes_per_step"] < fp32["bytes_per_step"] / 3, "the floor counts int8's weight bytes"
    assert "ours_at_precision" not in int8, "ours are not compared with ours at their precision"


def test_a_peer_without_its_venv_is_skipped_with_the_command_that_makes_it(tiny_fp32, tmp_path, monkeypatch):
    missing = {e: peers.Venv(str(tmp_path / "none"), v.module, v.setup) for e, v in peers.VENVS.items()}
    monkeypatch.setattr(peers, "VENVS", missing)
    results = run_bench(
        BenchConfig(model_folder=tiny_fp32, out=tmp_path, baselines=tuple(peers.PEERS), **SMALL)
    )
    assert results["ok"] and results["failures"] == []
    for name, peer in peers.PEERS.items():
        skipped = results["runners"][name]["skipped"]
        assert peer.engine in skipped and peers.VENVS[peer.engine].setup.split()[0] in skipped


def fake_runner(ms: float, tokens: list[int], **extra) -> dict:
    runs = [
        {"ttft_ms": 10.0, "decode_ms_per_token": ms, "tokens_per_s": 1e3 / ms, "python_overhead_ms": None}
    ]
    result = {"batch": 1, "prompt_len": 32, "new_tokens": 4, "runs": runs, "tokens": [tokens]}
    return {"device": "cpu", "peak_rss_mb": 1.0, "results": [result], **extra}


def test_each_runner_is_compared_with_ours_at_its_precision(tiny_int4):
    """int4 under test; ours at int8 too; llama.cpp's q4_0 and q8_0, CTranslate2's float32."""
    manifest = read_manifest(tiny_int4)
    results = {
        "machine": {"read_bandwidth_gbs": 10.0},
        "runners": {
            "gpt2-onnx": fake_runner(2.0, [1, 2, 3, 4]),
            "gpt2-onnx-int8": fake_runner(3.0, [1, 2, 3, 5]),
            "llama.cpp-q4_0": fake_runner(3.0, [1, 2, 0, 0], weight_bytes=4_000_000, kv_bytes=2),
            "llama.cpp-q8_0": fake_runner(4.5, [1, 2, 3, 4], weight_bytes=8_000_000, kv_bytes=2),
            "ctranslate2-float32": fake_runner(8.0, [1, 2, 3, 4], weight_bytes=16_000_000),
        },
    }
    runners = add_summaries(results, manifest)["runners"]
    q4, q8, f32 = (
        runners[n]["results"][0] for n in ("llama.cpp-q4_0", "llama.cpp-q8_0", "ctranslate2-float32")
    )
    assert (q4["ours_at_precision"], q4["decode_vs_ours_at_precision"]) == ("gpt2-onnx", 1.5)
    assert (q8["ours_at_precision"], q8["decode_vs_ours_at_precision"]) == ("gpt2-onnx-int8", 1.5)
    assert "ours_at_precision" not in f32, "no fp32 of ours ran"
    assert q8["decode_vs_ours"] == 2.25 and q4["token_agreement"] == 0.5 and q8["same_tokens_as_ours"]
    c = manifest.config
    kv = 2 * c.n_layer * 1 * (32 + 4 / 2) * c.n_embd
    assert q4["bytes_per_step"] == 4_000_000 + kv * 2, "a peer's floor counts its own file and cache type"
    assert f32["bytes_per_step"] == 16_000_000 + kv * 4
    ours = runners["gpt2-onnx"]["results"][0]
    assert ours["bytes_per_step"] == c.n_params * bench.WEIGHT_BYTES["int4"] + kv * 4


def run_peers(model, tmp_path, names: tuple[str, ...]) -> dict:
    results = run_bench(BenchConfig(model_folder=model, out=tmp_path, baselines=names, **SMALL))
    assert results["ok"] and results["failures"] == [], results["failures"]
    return results["runners"]


@pytest.mark.skipif(not HAS["llama.cpp"], reason=".venv-llamacpp is absent: run .ci/setup-llamacpp")
def test_llamacpp_runs_our_weights_and_tokens_after_its_checks(varied_fp32, tmp_path):
    runners = run_peers(varied_fp32, tmp_path, ("llama.cpp-f32", "llama.cpp-q8_0"))
    for name, precision in (("llama.cpp-f32", "fp32"), ("llama.cpp-q8_0", "int8")):
        data = runners[name]
        assert data["precision"] == precision and data["threads"] >= 1
        assert [r["batch"] for r in data["results"]] == [1], "llama-cpp-python runs one sequence"
        assert data["weight_bytes"] > 0 and data["greedy_checked"] == peers.CHECK_NEW_TOKENS
    f32 = runners["llama.cpp-f32"]
    assert f32["greedy_prefix_equal_to_transformers"] == peers.CHECK_NEW_TOKENS
    assert f32["results"][0]["same_tokens_as_ours"], "f32 GGUF of our fp32 weights: the same greedy tokens"
    assert f32["results"][0]["ours_at_precision"] == "gpt2-onnx"


@pytest.mark.skipif(not HAS["llama.cpp"], reason=".venv-llamacpp is absent: run .ci/setup-llamacpp")
def test_a_peer_that_reads_our_prompt_ids_differently_fails_before_timing(varied_fp32, tmp_path, monkeypatch):
    prepare = peers.prepare

    def other_ids(*args):
        spec = prepare(*args)
        spec["check"]["ids"] = spec["check"]["ids"][:-1] + [spec["check"]["ids"][-1] + 1]
        return spec

    monkeypatch.setattr(peers, "prepare", other_ids)
    results = run_bench(
        BenchConfig(model_folder=varied_fp32, out=tmp_path, baselines=("llama.cpp-f32",), **SMALL)
    )
    assert results["ok"], "a peer failing is not our failure"
    (failure,) = results["failures"]
    assert failure["runner"] == "llama.cpp-f32" and "CheckError" in failure["reason"]
    assert "token ids for the check text differ from ours" in failure["reason"]
    assert "results" not in results["runners"]["llama.cpp-f32"]


@pytest.mark.skipif(not HAS["ctranslate2"], reason=".venv-ctranslate2 is absent: run .ci/setup-ctranslate2")
def test_ctranslate2_runs_our_weights_and_tokens_after_its_checks(varied_fp32, tmp_path):
    runners = run_peers(varied_fp32, tmp_path, ("ctranslate2-float32", "ctranslate2-int8"))
    for name in ("ctranslate2-float32", "ctranslate2-int8"):
        assert [r["batch"] for r in runners[name]["results"]] == [1, 2], "CTranslate2 runs batches"
    f32 = runners["ctranslate2-float32"]
    assert f32["greedy_prefix_equal_to_transformers"] == peers.CHECK_NEW_TOKENS
    assert all(r["same_tokens_as_ours"] for r in f32["results"])


def test_peers_whose_models_cannot_be_prepared_are_failed_rows_with_the_reason(
    tiny_fp32, tmp_path, monkeypatch
):
    def broken(*args):
        raise RuntimeError("")

    monkeypatch.setattr(peers, "find_python", lambda engine: sys.executable)
    monkeypatch.setattr(peers, "prepare", broken)
    names = ("llama.cpp-f32", "ctranslate2-int8")
    results = run_bench(BenchConfig(model_folder=tiny_fp32, out=tmp_path, baselines=names, **SMALL))
    assert results["ok"] and results["runners"]["gpt2-onnx"]["results"], "ours still ran"
    reason = "preparing the peers' models failed: RuntimeError: (no message)"
    assert results["failures"] == [{"runner": n, "reason": reason, "ours": False} for n in names]
