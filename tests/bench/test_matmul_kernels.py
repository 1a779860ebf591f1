"""The kernel comparison (benchmarks/matmul_kernels.py) on a small matrix: every kernel runs, the
per-row paths give each row the result it gets alone, and their errors are those of 8-bit
weights and activations. (Speed is judged by running the benchmark, not here.)"""

from __future__ import annotations

import json

from gpt2onnx.benchmarks import matmul_kernels as kernels
from gpt2onnx.benchmarks.machine import ISA, cpu_isa


def test_every_kernel_runs_and_the_per_row_ones_are_row_invariant(tmp_path):
    kernels.main(["--shape", "64x96", "--layers", "2", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "kernels.json").read_text())
    (result,) = report["results"]
    got = result["kernels"]
    assert set(got) == set(kernels.KERNELS)
    assert got["fp32"]["error"] == 0.0
    for name in ("int8-row", "int7-row", "int8-row-s8s8", "int8-row-u8u8"):
        assert got[name]["rows_invariant"], name  # a row's tokens must not depend on the batch
    # 7-bit weights never saturate the u8 x s8 kernel's 16-bit pair sums; full-range int8 weights
    # do on CPUs without AVX-512 VNNI (its error there is a tenth of the output, not a rounding)
    for name in ("int7-row", "int8-row-s8s8", "int8-row-u8u8"):
        assert 1e-4 < got[name]["error"] < 0.05, (name, got[name]["error"])
    assert 0 < got["nbits8-b128"]["error"] < 0.02
    assert all(set(k["us_per_matrix"]) == {str(r) for r in kernels.ROWS} for k in got.values())
    table = (tmp_path / "kernels.md").read_text()
    assert table.count("| 64x96 |") == len(kernels.KERNELS)
    assert set(report["machine"]["isa"]) <= set(ISA) and report["machine"]["isa"] == cpu_isa()
