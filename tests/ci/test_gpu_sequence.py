"""The GPU run's sequence on the CPU: staging, the checks the printed `run` calls make, the phases'
refusal without CUDA and their bookkeeping (.ci/stage-ort-gpu, .ci/gpu/, .ci/gpu/README.md).

A GPU machine is lent rarely and forgets everything 30 s after a command, so what can be checked
without one is checked here: a small fake wheel is staged in tiny parts, received and installed
into a temporary folder exactly as the printed commands do it there, and broken on the way.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / ".ci"
SHELL_SCRIPTS = [
    "gpu-run",
    "gpu/receive-part",
    "gpu/install-ort",
    "gpu/lib.sh",
    "gpu/phase1",
    "gpu/phase2",
    "gpu/phase3",
    "gpu/profile",
]
INFO = "onnxruntime_gpu-1.31.1.dist-info"
FAKE_ORT = """__version__ = "1.31.1"


def get_available_providers():
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]
"""


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(path: Path, blob: bytes, tamper: bool = False) -> Path:
    """A pip-installable onnxruntime_gpu wheel whose onnxruntime lists the CUDA provider; `blob`
    sets its size and how well it compresses. tamper: a file that differs from its RECORD line."""
    files = {
        "onnxruntime/__init__.py": FAKE_ORT.encode(),
        "onnxruntime/blob.bin": blob,
        f"{INFO}/METADATA": b"Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n",
        f"{INFO}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},{record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{INFO}/RECORD"] = (record + f"{INFO}/RECORD,,\n").encode()
    if tamper:
        files["onnxruntime/blob.bin"] = blob[:-1] + bytes([blob[-1] ^ 1])
    wheel = path / "onnxruntime_gpu-1.31.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return wheel


def random_blob(n: int, seed: int = 0) -> bytes:
    """Incompressible: neither the wheel's deflate nor xz shrinks it."""
    return random.Random(seed).randbytes(n)


def repeated_blob(period: int, times: int) -> bytes:
    """A random block repeated beyond deflate's 32 KiB window: only xz's large dictionary shrinks
    it, as with the real wheel (deflated already, about 15% smaller again under xz)."""
    return random_blob(period) * times


def folder(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


def stage(tmp_path: Path, wheel: Path, compression: str = "auto", part_kib: int = 48) -> Path:
    """Runs .ci/stage-ort-gpu on a local file into tmp_path/stage; returns that folder."""
    out = tmp_path / "stage"
    cmd = [
        sys.executable,
        str(CI / "stage-ort-gpu"),
        "--wheel",
        str(wheel),
        "--stage-dir",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
        "--part-mib",
        str(part_kib / 1024),
        "--compression",
        compression,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def manifest(stage_dir: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (stage_dir / "p1" / "manifest").read_text().splitlines())


def gpu_side(
    script: str, *args: str, stage_dir: Path, tmp_path: Path, **env: str
) -> subprocess.CompletedProcess:
    """A .ci/gpu script as the printed `run` command calls it, with /tmp/ortgpu and /tmp/site moved
    into tmp_path and this interpreter as python3."""
    full = {k: v for k, v in os.environ.items() if k != "OUT"}
    full.update(
        {
            "ORTGPU_STAGE": str(stage_dir),
            "ORTGPU_DIR": str(tmp_path / "ortgpu"),
            "ORTGPU_SITE": str(tmp_path / "site"),
            "PYTHON": sys.executable,
            **env,
        }
    )
    return subprocess.run([str(CI / "gpu" / script), *args], capture_output=True, text=True, env=full)


def receive(n: int, stage_dir: Path, tmp_path: Path, parts=None) -> None:
    for k in parts or range(1, n + 1):
        proc = gpu_side("receive-part", str(k), stage_dir=stage_dir, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("compression", ["none", "xz"])
def test_parts_reassemble_install_and_list_the_cuda_provider(tmp_path, compression):
    wheel = make_wheel(tmp_path, repeated_blob(100_000, 3))
    stage_dir = stage(tmp_path, wheel, compression)
    n = int(manifest(stage_dir)["parts"])
    assert n >= 2 and all(
        (stage_dir / f"p{k}" / f"part{k:02d}").stat().st_size <= 48 * 1024 for k in range(1, n + 1)
    )
    receive(n, stage_dir, tmp_path)
    proc = gpu_side("install-ort", stage_dir=stage_dir, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CUDAExecutionProvider" in proc.stdout
    assert (
        hashlib.sha256((tmp_path / "ortgpu" / wheel.name).read_bytes()).digest()
        == hashlib.sha256(wheel.read_bytes()).digest()
    )
    assert (tmp_path / "site" / "onnxruntime" / "blob.bin").is_file()
    again = gpu_side("install-ort", stage_dir=stage_dir, tmp_path=tmp_path)
    assert again.returncode == 0 and "already holds" in again.stdout


def test_auto_compresses_only_when_that_saves_a_part(tmp_path):
    compressible = stage(tmp_path / "a", make_wheel(folder(tmp_path, "a"), repeated_blob(40_000, 6)))
    assert manifest(compressible)["compression"] == "xz" and manifest(compressible)["parts"] == "1"
    incompressible = stage(tmp_path / "b", make_wheel(folder(tmp_path, "b"), random_blob(240_000)))
    assert manifest(incompressible)["compression"] == "none" and int(manifest(incompressible)["parts"]) >= 5


def test_a_missing_earlier_part_means_start_over(tmp_path):
    stage_dir = stage(tmp_path, make_wheel(tmp_path, random_blob(200_000)), "none")
    receive(3, stage_dir, tmp_path, parts=[1])
    proc = gpu_side("receive-part", "3", stage_dir=stage_dir, tmp_path=tmp_path)
    assert proc.returncode == 3 and "start over from part 1: part 2 is missing" in proc.stderr
    assert not (tmp_path / "ortgpu" / "part03").exists()


def test_a_corrupt_part_is_caught_by_the_next_part_and_by_the_install(tmp_path):
    stage_dir = stage(tmp_path, make_wheel(tmp_path, random_blob(200_000)), "none")
    n = int(manifest(stage_dir)["parts"])
    receive(n, stage_dir, tmp_path)
    part = tmp_path / "ortgpu" / "part01"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    nxt = gpu_side("receive-part", "2", stage_dir=stage_dir, tmp_path=tmp_path)
    assert nxt.returncode == 3 and "start over from part 1: part 1" in nxt.stderr
    install = gpu_side("install-ort", stage_dir=stage_dir, tmp_path=tmp_path)
    assert install.returncode == 3 and "start over from part 1: part 1 of" in install.stderr
    assert not (tmp_path / "site" / "onnxruntime").exists()


def test_parts_of_two_stagings_do_not_mix(tmp_path):
    first = stage(tmp_path / "a", make_wheel(folder(tmp_path, "a"), random_blob(200_000, 1)), "none")
    second = stage(tmp_path / "b", make_wheel(folder(tmp_path, "b"), random_blob(200_000, 2)), "none")
    receive(1, first, tmp_path)
    proc = gpu_side("receive-part", "2", stage_dir=second, tmp_path=tmp_path)
    assert proc.returncode == 3 and "start over from part 1" in proc.stderr


def test_a_part_not_carried_is_named(tmp_path):
    stage_dir = stage(tmp_path, make_wheel(tmp_path, random_blob(100_000)), "none")
    proc = gpu_side("receive-part", "1", stage_dir=tmp_path / "nowhere", tmp_path=tmp_path)
    assert proc.returncode == 3 and "in this run's carry" in proc.stderr
    assert gpu_side("receive-part", "9", stage_dir=stage_dir, tmp_path=tmp_path).returncode == 3


def test_install_refuses_a_wheel_whose_files_differ_from_its_record(tmp_path):
    stage_dir = stage(tmp_path, make_wheel(tmp_path, random_blob(60_000), tamper=True), "none")
    receive(int(manifest(stage_dir)["parts"]), stage_dir, tmp_path)
    proc = gpu_side("install-ort", stage_dir=stage_dir, tmp_path=tmp_path)
    assert proc.returncode == 3 and "onnxruntime/blob.bin" in proc.stderr and "RECORD" in proc.stderr


def test_the_printed_sequence_carries_one_part_per_run_and_chains_the_install(tmp_path):
    stage_dir = stage(tmp_path, make_wheel(tmp_path, random_blob(200_000)), "none")
    n = int(manifest(stage_dir)["parts"])
    calls = json.loads((stage_dir / "sequence.json").read_text())
    assert [c["carry"] for c in calls[:n]] == [[f"{stage_dir}/p{k}"] for k in range(1, n + 1)]
    assert ".ci/gpu/install-ort && .ci/gpu/phase1" in calls[n - 1]["command"]
    assert [c["command"].split("; ")[-1] for c in calls[n:]] == [".ci/gpu/phase2", ".ci/gpu/phase3"]
    for call in calls:
        assert len(call["command"]) <= 2000 and len(call["carry"]) <= 8 and call["timeout_s"] <= 600
        for script in re.findall(r"\.ci/gpu/[\w-]+", call["command"]):
            assert os.access(ROOT / script, os.X_OK), script
    assert "tokenizer" not in json.dumps(calls)  # it ships inside the package now


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(CI / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def cuda_usable() -> bool:
    gate = subprocess.run([sys.executable, str(CI / "gpu" / "check_cuda.py"), "gate"], capture_output=True)
    return gate.returncode == 0


@pytest.mark.skipif(cuda_usable(), reason="this machine has a usable CUDA provider: the phases would run")
@pytest.mark.parametrize("phase", ["phase1", "phase2", "phase3"])
def test_phases_refuse_in_one_line_without_the_cuda_provider(tmp_path, phase):
    out = tmp_path / "out"
    proc = gpu_side(phase, stage_dir=tmp_path, tmp_path=tmp_path, OUT=str(out))
    assert proc.returncode == 4
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused: no usable CUDA provider"), proc.stderr
    assert list(out.iterdir()) == []  # nothing ran before the gate


def run_lib(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    script = f'source "{CI}/gpu/lib.sh"; PHASE=9; LOG=$OUT/phase9.log; {body}'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)


def test_steps_are_recorded_as_they_end_and_finish_fails_if_one_did(tmp_path):
    proc = run_lib(
        tmp_path,
        "step good 60 true; step bad 60 false; deadline=$(( $(date +%s) + 40 )); step late 60 true; finish",
    )
    assert proc.returncode == 1
    rows = [line.split("\t") for line in (tmp_path / "status.tsv").read_text().splitlines()]
    assert [(r[1], r[2]) for r in rows] == [("good", "0"), ("bad", "1"), ("late", "skipped")]
    assert "late" in proc.stdout and "FAILED" in proc.stdout
    assert run_lib(tmp_path / "ok", "step good 60 true; finish").returncode == 0


def test_the_phases_export_the_folder_bench_and_generate_look_for(tmp_path):
    from gpt2onnx.export.model_source import resolve_model

    name = re.search(r"^FP16_124M=\$MODELS/(\S+)$", (CI / "gpu" / "lib.sh").read_text(), re.M).group(1)
    folder = tmp_path / name
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    assert resolve_model(None, "gpt2", 0, "fp16", None, str(tmp_path), "shared") == folder


def test_phase2_names_the_batches_left_for_a_next_run(tmp_path):
    """The bookkeeping of a phase past its gate (faked here: there is no GPU), with no time for any
    bench: each batch is recorded as not started and the last line names the call that runs them."""
    fake = tmp_path / "python3"
    gate = "[[ $1 == .ci/gpu/check_cuda.py && $2 == gate ]] && exit 0"
    fake.write_text(f'#!/usr/bin/env bash\n{gate}\nexec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    model = tmp_path / "models" / "random-gpt2-seed0-fp16-shared"
    model.mkdir(parents=True)
    (model / "manifest.json").write_text("{}")
    out = tmp_path / "out"
    proc = gpu_side(
        "phase2",
        "1",
        "64",
        stage_dir=tmp_path,
        tmp_path=tmp_path,
        OUT=str(out),
        PYTHON=str(fake),
        GPU_MODELS_DIR=str(model.parent),
        GPU_BENCH_MIN_S="100000",
    )
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1].startswith("next run: .ci/gpu/phase2 1 64")
    rows = [line.split("\t")[1:3] for line in (out / "status.tsv").read_text().splitlines()]
    assert (
        ["bench-b1", "skipped"] in rows and ["bench-b64", "skipped"] in rows and ["export-124m", "0"] in rows
    )


def test_per_batch_results_merge_into_one_report(tmp_path):
    """phase2's bench-b1.json and bench-b8.json become one result folder with every row."""
    spec = importlib.util.spec_from_file_location("merge_results", CI / "gpu" / "merge_results.py")
    merge_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge_results)

    source = json.loads(
        (ROOT / "benchmarks/results/cpu-2core-2026-11-25-quick-fp32-shared/results.json").read_text()
    )
    files = []
    for batch in (8, 1):
        part = json.loads(json.dumps(source))
        part["settings"]["batches"], part["settings"]["configs"] = [batch], [[batch, 32, 128]]
        for data in part["runners"].values():
            for r in data.get("results", []):
                r["batch"] = batch
        files.append(tmp_path / f"bench-b{batch}.json")
        files[-1].write_text(json.dumps(part))
    assert merge_results.main([str(tmp_path / "merged"), *map(str, files)]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["settings"]["batches"] == [1, 8]
    for name in source["runners"]:
        assert [r["batch"] for r in merged["runners"][name]["results"]] == [1, 8], name
    rows = [line for line in (tmp_path / "merged" / "results.md").read_text().splitlines()
            if line.startswith("| gpt2-onnx |")]  # fmt: skip
    assert any("| 8 | 32 | 128 |" in row for row in rows), rows


def test_the_cuda_probe_model_loads_in_this_onnxruntime():
    """check_cuda.py's MatMul probe carries an IR version onnxruntime reads (a newer onnx would
    write one that onnxruntime 1.31 refuses: 'Unsupported model IR version: 14')."""
    import importlib.util

    import numpy as np
    import onnxruntime as ort

    spec = importlib.util.spec_from_file_location("check_cuda", CI / "gpu" / "check_cuda.py")
    check_cuda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_cuda)
    session = ort.InferenceSession(check_cuda.matmul_model(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones((4, 64), dtype=np.float16)})
    assert float(y[0, 0]) == 32.0
