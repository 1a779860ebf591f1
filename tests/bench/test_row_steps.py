"""benchmarks/row_steps.py on the tiny model: every folder is timed at every row count, a bad
folder argument is refused by name."""

from __future__ import annotations

import json

import pytest

from gpt2onnx.benchmarks import row_steps


def test_row_steps_times_each_folder_at_each_row_count(tiny_int8_shared, tiny_shared, tmp_path, capsys):
    row_steps.main([f"int8={tiny_int8_shared}", f"fp32={tiny_shared}", "--out", str(tmp_path),
                    "--rows", "1,3", "--rounds", "1", "--new-tokens", "3"])  # fmt: skip
    result = json.loads((tmp_path / "row_steps.json").read_text())
    assert set(result["ms_per_step"]) == {"int8", "fp32"}
    assert all(set(s) == {"1", "3"} and min(s.values()) > 0 for s in result["ms_per_step"].values())
    assert result["machine"]["isa"] and set(result["most_over_one_row"]) == {"int8", "fp32"}


def test_unsigned_adds_each_int8_folder_with_u8_weights(tiny_int8_shared, tiny_shared, tmp_path, capsys):
    row_steps.main([f"int8={tiny_int8_shared}", f"fp32={tiny_shared}", "--out", str(tmp_path), "--unsigned",
                    "--rows", "1", "--rounds", "1", "--new-tokens", "2"])  # fmt: skip
    result = json.loads((tmp_path / "row_steps.json").read_text())
    assert result["signed_int8"] == {"int8": True, "fp32": True, "int8-u8": False}
    assert set(result["ms_per_step"]) == {"int8", "fp32", "int8-u8"}


def test_a_folder_without_a_name_is_refused(tiny_shared, tmp_path, capsys):
    with pytest.raises(SystemExit):
        row_steps.main([str(tiny_shared), "--out", str(tmp_path)])
    assert "pass NAME=FOLDER with an exported model folder" in capsys.readouterr().err
