"""The speculation benchmark: prompt lookup and a draft model beside plain decoding, its report
and the draft's measured cost (what Engine.load judged its default by)."""

import json

from gpt2onnx.benchmarks.speculation_bench import main

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_each_method_runs_beside_plain_decoding_and_is_reported(tiny_shared, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    main(["--model", str(tiny_shared), "--draft", str(tiny_shared), "--text", str(text), "--out", str(out),
          "--prompts", "2", "--new-tokens", "6", "--rounds", "1", "--threads", "1"])  # fmt: skip
    result = json.loads((out / "speculation_bench.json").read_text())
    runs = {(r["prompts"], r["method"].split()[0]): r for r in result["runs"]}
    assert set(runs) == {(k, m) for k in ("repeat", "plain") for m in ("prompt", "draft")}
    for (_, method), r in runs.items():
        assert r["same_tokens"] and r["speedup"] > 0 and r["proposed"] >= r["accepted"] >= 0
        assert (r["draft_run_cost"] is None) == (method == "prompt")
    draft = runs["repeat", "draft"]
    assert draft["accepted"] == draft["proposed"] > 0  # the target as its own draft: all kept
    assert 0.3 < draft["draft_run_cost"] < 3 and draft["default"] is False  # the same model: no default
    report = (out / "speculation_bench.md").read_text()
    assert "| draft run / target run |" in report and "(when asked)" in report and "CPU:" in report
