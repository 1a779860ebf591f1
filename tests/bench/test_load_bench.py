"""The load benchmark (gpt2-onnx bench-serve): the same seeded workload through every runner,
every request answered with all its tokens, and the results written."""

from __future__ import annotations

import json

from gpt2onnx.benchmarks import load
from gpt2onnx.cli import main


def test_the_workload_is_seeded_and_in_range():
    a, b = load.workload(20, 4.0, 1000, seed=3), load.workload(20, 4.0, 1000, seed=3)
    assert a == b and a != load.workload(20, 4.0, 1000, seed=4)
    assert all(16 <= len(j.prompt) <= 256 and 16 <= j.max_tokens <= 256 for j in a)
    arrivals = [j.arrival for j in a]
    assert arrivals == sorted(arrivals) and 1.0 < arrivals[-1] < 20.0  # about 20 / 4 = 5 s


def test_every_runner_answers_every_request_in_full(tiny_shared, tmp_path, capsys):
    out = tmp_path / "load"
    code = main(["bench-serve", "--model", str(tiny_shared), "--out", str(out), "--requests", "6",
                 "--clients", "3", "--rates", "20", "--max-batch", "3", "--prompt-lens", "4,30",
                 "--new-tokens", "4,30", "--runners", "continuous,batch1,static,llamacpp"])  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    jobs = load.workload(6, 20.0, results["vocab_size"], 0, (4, 30), (4, 30))
    want = sum(j.max_tokens for j in jobs)
    ran = [r for r in results["runs"] if "skipped" not in r]
    assert {r["runner"] for r in ran} >= {"continuous", "batch1", "static"}
    for r in ran:
        assert r["errors"] == 0 and r["requests"] == 6, r
        assert r["new_tokens"] == want, r  # EOS ignored: every request gets all its max_tokens
        assert r["tokens_per_s"] > 0 and r["ttft_ms_p50"] > 0
    assert {r["load"] for r in ran} == {"closed", "open"}
    assert (out / "results.md").read_text().count("| continuous |") == 2
    assert (out / "throughput.png").stat().st_size > 1000
