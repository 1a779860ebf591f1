"""The per-row 8-bit experiment (benchmarks/rows_int8.py) on the tiny model: the rewritten
folder loads, keeps the fp32 model's logits within 8-bit rounding, and a row's greedy tokens in a
batch equal the row's alone (each row has its own activation scale)."""

from __future__ import annotations

import numpy as np

from gpt2onnx import Engine
from gpt2onnx.benchmarks.rows_int8 import rewrite


def test_rows_int8_is_row_invariant_and_close_to_fp32(varied_shared, tmp_path):
    assert rewrite(varied_shared, tmp_path / "rows") == 2 * 4 + 1  # 4 weight MatMuls a layer, the head
    rows, fp32 = Engine.load(tmp_path / "rows", provider="cpu"), Engine.load(varied_shared, provider="cpu")
    ids = [[5, 17, 300, 9, 12], [40, 41, 42]]
    got, want = rows.logits(ids[1]), fp32.logits(ids[1])
    assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()
    together = rows.generate(ids, max_new_tokens=8, ignore_eos=True).completions
    alone = [rows.generate([p], max_new_tokens=8, ignore_eos=True).completions[0] for p in ids]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
