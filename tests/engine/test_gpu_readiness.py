"""What would break on the first CUDA run, checked on the CPU: finding the CUDA
libraries without torch, a shared-cache model the GPU cannot run, and a CUDA graph whose
capture fails at its first run. The GPU is faked (cuda_device_count), so is the library loader."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from gpt2onnx.engine import cuda_libs
from gpt2onnx.engine import runtime as runtime_module
from gpt2onnx.engine import session as session_module
from gpt2onnx.engine.cuda_graphs import GraphRunner
from gpt2onnx.engine.engine import Engine
from gpt2onnx.engine.kv_cache import SharedCache
from gpt2onnx.engine.pickers import DeviceSamplingPicker
from gpt2onnx.engine.requests import RequestFailedError
from gpt2onnx.engine.runtime import ProviderError

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over",
    "a",
    "Once upon a time, in a land far away, there lived",
]
# CUDA 13's nvidia/cu13 package, in the order the libraries must be loaded (cuBLAS links cuBLASLt)
CU13 = ["libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libnvrtc.so.13",
        "libcufft.so.12"]  # fmt: skip
CAPTURE_ERROR = (  # what onnxruntime raises when a kernel may not run inside a capture
    "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 900: operation not permitted when stream is capturing"
)
NOT_ON_SYSTEM = "cannot open shared object file: No such file or directory"


def nvidia_site(root: Path, packages: dict[str, list[str]]) -> Path:
    """A site-packages folder holding empty nvidia/<package>/lib/<file> files."""
    for package, files in packages.items():
        lib = root / "nvidia" / package / "lib"
        lib.mkdir(parents=True)
        for name in files:
            (lib / name).write_bytes(b"")
    return root


class Loader:
    """Stands in for dlopen: records every name; a bare name (the system's search path) fails
    unless listed in `system`, a full path loads."""

    def __init__(self):
        self.calls: list[str] = []
        self.system: set[str] = set()
        self.broken: set[str] = set()  # full paths whose load fails

    def __call__(self, name: str) -> None:
        self.calls.append(name)
        if "/" not in name and name not in self.system:
            raise OSError(f"{name}: {NOT_ON_SYSTEM}")
        if name in self.broken:
            raise OSError(f"{name}: undefined symbol: cudnnGetVersion\n(second line)")


@pytest.fixture
def loader(monkeypatch) -> Loader:
    fake = Loader()
    monkeypatch.setattr(cuda_libs, "dlopen", fake)
    return fake


def only_on_path(monkeypatch, *sites: Path) -> None:
    """sys.path with the fake sites first and no real nvidia package folder (a GPU machine has some)."""
    real = [p for p in sys.path if not (Path(p or ".") / "nvidia").is_dir()]
    monkeypatch.setattr(sys, "path", [str(s) for s in sites] + real)


@pytest.fixture
def gpu(monkeypatch):
    """The driver reports one GPU."""
    monkeypatch.setattr(runtime_module, "cuda_device_count", lambda: 1)


# -- 2. CUDA library discovery -------------------------------------------------------------------


def test_libraries_are_found_anywhere_on_sys_path_and_loaded_dependencies_first(
    tmp_path, monkeypatch, loader
):
    """onnxruntime installed on its own (pip --target) has no nvidia folder beside it: the
    libraries are found in torch's site-packages and in a cuDNN package elsewhere on sys.path."""
    torch_site = nvidia_site(tmp_path / "torch-site", {"cu13": CU13})
    cudnn_site = nvidia_site(tmp_path / "cudnn-site", {"cudnn": ["libcudnn.so.9", "libcudnn_ops.so.9"]})
    later = nvidia_site(tmp_path / "later", {"cu13": CU13, "cudnn": ["libcudnn.so.9"]})  # shadowed
    ort_site = tmp_path / "ort-site"
    (ort_site / "onnxruntime").mkdir(parents=True)
    sites = [ort_site, tmp_path / "absent", torch_site, cudnn_site, later]
    monkeypatch.setattr(sys, "path", [str(site) for site in sites])
    assert cuda_libs.preload(13) == {}
    cu13 = torch_site / "nvidia" / "cu13" / "lib"
    want = [cu13 / name for name in CU13] + [cudnn_site / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9"]
    assert loader.calls == [str(path) for path in want]


def test_the_per_library_layout_is_found_and_optional_libraries_may_be_missing(tmp_path, monkeypatch, loader):
    """Before CUDA 13's nvidia/cu13 package each library had its own folder. cuFFT and NVRTC serve
    a few operators only: missing, they are tried on the system's path and not reported."""
    packages = {"cuda_runtime": ["libcudart.so.13"], "cublas": ["libcublas.so.13", "libcublasLt.so.13"],
                "curand": ["libcurand.so.10"], "cudnn": ["libcudnn.so.9"]}  # fmt: skip
    site = nvidia_site(tmp_path, packages)
    monkeypatch.setattr(sys, "path", [str(site)])
    assert cuda_libs.preload(13) == {}
    nv = site / "nvidia"
    assert loader.calls == [
        str(nv / "cuda_runtime/lib/libcudart.so.13"),
        str(nv / "cublas/lib/libcublasLt.so.13"),
        str(nv / "cublas/lib/libcublas.so.13"),
        str(nv / "curand/lib/libcurand.so.10"),
        "libnvrtc.so.13",
        "libcufft.so.12",
        str(nv / "cudnn/lib/libcudnn.so.9"),
    ]


def test_a_required_library_found_nowhere_is_reported_and_the_system_path_counts(
    tmp_path, monkeypatch, loader
):
    monkeypatch.setattr(sys, "path", [str(nvidia_site(tmp_path, {"cu13": CU13}))])
    missing = cuda_libs.preload(13)
    assert missing == {"libcudnn.so.9": cuda_libs.NOT_FOUND}
    assert cuda_libs.describe(missing) == f"libcudnn.so.9 {cuda_libs.NOT_FOUND}"
    loader.system.add("libcudnn.so.9")  # e.g. a system-wide cuDNN in the linker's cache
    assert cuda_libs.preload(13) == {}


def test_a_library_that_fails_to_load_is_reported_with_the_loader_error(tmp_path, monkeypatch, loader):
    """The architecture folder some packages have (lib/x86_64) is searched too."""
    site = nvidia_site(tmp_path, {"cu13": CU13, "cudnn": []})
    (site / "nvidia/cudnn/lib/x86_64").mkdir()
    (site / "nvidia/cudnn/lib/x86_64/libcudnn.so.9").write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(site)])
    loader.broken.add(str(site / "nvidia/cudnn/lib/x86_64/libcudnn.so.9"))
    (why,) = cuda_libs.preload(13).values()
    assert why.startswith("found at ") and why.endswith("undefined symbol: cudnnGetVersion (second line))")


def test_the_cuda_version_comes_from_the_onnxruntime_build():
    assert [cuda_libs.cuda_major(v) for v in ("13.0", "12.8", "", None)] == [13, 12, 13, 13]
    assert "libcufft.so.11" in [lib.soname for lib in cuda_libs.libraries(12)]


def test_explicit_cuda_with_a_missing_library_names_it(tiny_fp32, tmp_path, monkeypatch, loader, gpu):
    only_on_path(monkeypatch, nvidia_site(tmp_path, {"cu13": CU13}))
    attempt = lambda *a, **k: pytest.fail("a CUDA session was attempted")  # noqa: E731
    monkeypatch.setattr(runtime_module.ort, "InferenceSession", attempt)
    with pytest.raises(ProviderError, match=r"libcudnn\.so\.9 not found .*--provider cpu") as info:
        Engine.load(tiny_fp32, provider="cuda")
    assert "\n" not in str(info.value)


def test_auto_with_a_missing_library_runs_on_the_cpu(tiny_fp32, tmp_path, monkeypatch, loader, gpu, caplog):
    only_on_path(monkeypatch, nvidia_site(tmp_path, {"cudnn": ["libcudnn.so.9"]}))
    created, real = [], ort.InferenceSession

    def recording(source, options, providers, **kw):
        assert kw == {"enable_fallback": 0}, "a session that may switch itself to the CPU"
        created.append(providers)
        return real(source, options, providers=providers, **kw)

    monkeypatch.setattr(runtime_module.ort, "InferenceSession", recording)
    with caplog.at_level(logging.WARNING, logger="gpt2onnx"):
        engine = Engine.load(tiny_fp32, provider="auto")
    assert engine.device == "cpu" and created and all(p == ["CPUExecutionProvider"] for p in created)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "libcublasLt.so.13" in warning and "running on the CPU" in warning and "\n" not in warning
    assert len(engine.generate("Hello", max_new_tokens=3).completions[0].token_ids) == 3


@pytest.mark.parametrize("provider, gpus", [("cpu", 1), ("auto", 0)])
def test_nothing_is_loaded_on_the_cpu_path(tiny_fp32, tmp_path, monkeypatch, loader, provider, gpus):
    only_on_path(monkeypatch, nvidia_site(tmp_path, {"cu13": CU13, "cudnn": ["libcudnn.so.9"]}))
    monkeypatch.setattr(runtime_module, "cuda_device_count", lambda: gpus)
    assert Engine.load(tiny_fp32, provider=provider).device == "cpu"
    assert loader.calls == []


# -- 3. a shared cache the GPU cannot run --------------------------------------------------------


@pytest.mark.parametrize("folder", ["tiny_shared", "tiny_int8_shared"])
def test_explicit_cuda_refuses_a_non_fp16_shared_cache(request, folder, monkeypatch, gpu):
    path = request.getfixturevalue(folder)
    monkeypatch.setattr(
        session_module, "create_session", lambda *a, **k: pytest.fail("a session was created")
    )
    fix = "fp16 only.*--dtype fp16 --kv-cache shared for the GPU, or use --provider cpu"
    with pytest.raises(ProviderError, match=fix) as info:
        Engine.load(path, provider="cuda")
    assert "\n" not in str(info.value)


def test_auto_runs_a_non_fp16_shared_cache_on_the_cpu(tiny_shared, monkeypatch, loader, gpu, caplog):
    providers, real = [], session_module.create_session

    def recording(model, provider, *args):
        providers.append(provider)
        return real(model, provider, *args)

    monkeypatch.setattr(session_module, "create_session", recording)
    with caplog.at_level(logging.WARNING, logger="gpt2onnx"):
        engine = Engine.load(tiny_shared, provider="auto")
    assert engine.device == "cpu" and providers == ["cpu"] and loader.calls == []  # no CUDA session attempted
    assert type(engine.session.cache) is SharedCache  # no fixed decode shapes without capture
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "fp32" in warning and "--dtype fp16 --kv-cache shared" in warning and "\n" not in warning
    assert len(engine.generate("Hello", max_new_tokens=3).completions[0].token_ids) == 3


@pytest.mark.parametrize("folder", ["tiny_fp16_shared", "tiny_fp32"])
def test_models_the_gpu_can_run_go_to_the_cuda_provider(request, folder, monkeypatch, gpu):
    """fp16 with the shared cache and any concat-cache model: no refusal, no detour."""
    path = request.getfixturevalue(folder)
    asked = []

    def stop(model, provider, *args):
        asked.append(provider)
        raise ProviderError("stop here")

    monkeypatch.setattr(runtime_module, "load_cuda_libraries", lambda provider: True)  # found (tested above)
    monkeypatch.setattr(session_module, "create_session", stop)
    with pytest.raises(ProviderError, match="stop here"):
        Engine.load(path, provider="cuda")
    assert asked == ["cuda"]


@pytest.mark.parametrize("provider", ["cuda", "auto"])
def test_a_cuda_provider_failure_is_one_error_never_a_switch_to_the_cpu(
    tiny_fp16_shared, monkeypatch, gpu, capfd, provider
):
    """onnxruntime's Python session, left to itself, answers a provider failure by printing "EP
    Error" banners to stdout and retrying on the CPU (after which our IO binding belongs to a dead
    session). Every session here is made with enable_fallback=0, so the failure is one line."""
    real, asked = ort.InferenceSession, []

    def failing(source, options, providers, **kw):
        asked.append((providers, kw))
        if kw.get("enable_fallback", 1) != 0:  # onnxruntime's own default: banners, then the CPU
            return real(source, options, providers=providers, **kw)
        raise RuntimeError("[ONNXRuntimeError] : 11 : EP_FAIL : CUDA failure 100: no CUDA-capable device")

    monkeypatch.setattr(runtime_module, "load_cuda_libraries", lambda provider: True)
    monkeypatch.setattr(runtime_module.ort, "InferenceSession", failing)
    with pytest.raises(ProviderError, match="CUDA execution provider could not run .*EP_FAIL") as info:
        Engine.load(tiny_fp16_shared, provider=provider, cuda_graphs=False)
    assert "\n" not in str(info.value) and "--provider cpu" in str(info.value)
    assert [kw for _, kw in asked] == [{"enable_fallback": 0}]
    assert capfd.readouterr().out == ""


def test_an_unreadable_model_is_a_model_folder_error_on_cuda_too(tmp_path, gpu):
    """A model onnxruntime cannot parse is the folder's fault, whichever provider was asked for."""
    from gpt2onnx.engine.contract import ModelFolderError
    from gpt2onnx.engine.runtime import create_session

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFolderError, match="re-export"):
        create_session(bad, "cuda", None)


# -- 4. a CUDA graph whose capture fails at its first run ----------------------------------------


class FailingCapture:
    """Wraps an InferenceSession: its `fail_at`-th run under a CUDA graph id raises as a failed
    capture does; with `ran`, only after the step ran (onnxruntime's warm-up runs write the cache)."""

    def __init__(self, session, fail_at: int = 1, ran: bool = False):
        self.session, self.fail_at, self.ran = session, fail_at, ran
        self.graph_ids: list[str] = []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, io, options=None):
        graph_id = options.get_run_config_entry("gpu_graph_id")
        self.graph_ids.append(graph_id)
        if graph_id != "-1" and sum(g != "-1" for g in self.graph_ids) == self.fail_at:
            if self.ran:
                self.session.run_with_iobinding(io, options)
            raise Fail(CAPTURE_ERROR)
        self.session.run_with_iobinding(io, options)


def tokens(result) -> list[list[int]]:
    return [c.token_ids for c in result.completions]


def graphs_on(folder, **kw) -> Engine:
    """A CUDA-graph-cache engine on the CPU that believes its graphs are captured, as on the GPU."""
    engine = Engine.load(folder, provider="cpu", max_batch=4, cuda_graphs=True, **kw)
    engine.session.graphs.on.update(decode=True, sampling=True)
    return engine


@pytest.mark.parametrize("ran", [False, True], ids=["before-the-step", "after-the-step"])
def test_a_failed_first_capture_falls_back_without_graphs_and_keeps_the_tokens(tiny_shared, caplog, ran):
    want = Engine.load(tiny_shared, provider="cpu", max_batch=4, cuda_graphs=True)
    engine = graphs_on(tiny_shared)
    session = engine.session
    session.ort_session = failing = FailingCapture(session.ort_session, ran=ran)
    with caplog.at_level(logging.WARNING, logger="gpt2onnx"):
        got = engine.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
        one = engine.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True)  # another bucket, afterwards
    assert tokens(got) == tokens(want.generate(PROMPTS, max_new_tokens=8, ignore_eos=True))
    assert tokens(one) == tokens(want.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "CUDA graphs are off" in warning and "\n" not in warning
    assert session.graphs.on == {"decode": False, "sampling": True}
    assert "decode graph of batch bucket 4" in session.graphs.fallback
    assert "stream is capturing" in session.graphs.fallback
    assert failing.graph_ids[:3] == ["-1", "3", "-1"]  # prefill, the failed capture, the same step again
    assert set(failing.graph_ids[2:]) == {"-1"}  # no graph is tried again, in any bucket


def test_a_failed_replay_is_raised_not_hidden(tiny_shared):
    """Only a bucket's first graph run is a capture: a later failure is a real error."""
    engine = graphs_on(tiny_shared)
    engine.session.ort_session = FailingCapture(engine.session.ort_session, fail_at=3)
    with pytest.raises(RequestFailedError, match="stream is capturing") as failed:
        engine.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert isinstance(failed.value.__cause__, Fail)  # onnxruntime's own error, chained
    assert engine.session.cuda_graphs is True and engine.session.graphs.fallback is None


def test_a_failed_first_capture_of_the_sampling_graph_falls_back_too(tiny_shared, caplog):
    settings = {"max_new_tokens": 8, "ignore_eos": True, "top_k": 20, "seed": 1}
    want = Engine.load(tiny_shared, provider="cpu", max_batch=4, cuda_graphs=True, device_sampling=True)
    engine = graphs_on(tiny_shared, device_sampling=True)
    session = engine.session
    session.sampling_session = FailingCapture(session.sampling_session, ran=True)
    with caplog.at_level(logging.WARNING, logger="gpt2onnx"):
        got = engine.generate(PROMPTS, **settings)
    assert isinstance(session.picker, DeviceSamplingPicker)
    assert tokens(got) == tokens(want.generate(PROMPTS, **settings))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert session.graphs.on == {"decode": True, "sampling": False}
    assert "sampling graph of batch bucket 4" in session.graphs.fallback


def test_sessions_that_never_failed_say_so(tiny_shared, tiny_fp32):
    for folder, graphs in ((tiny_shared, True), (tiny_fp32, None)):
        engine = Engine.load(folder, provider="cpu", cuda_graphs=graphs)
        engine.generate(PROMPTS[:2], max_new_tokens=3)
        assert engine.session.graphs.fallback is None


def test_a_capture_refused_at_session_creation_is_recorded():
    graphs = GraphRunner((1, 2), {"decode": True, "sampling": False}, asked=("decode", "sampling"))
    assert graphs.fallback == "onnxruntime refused to capture the sampling graph at session creation"
    assert graphs.on == {"decode": True, "sampling": False}
    assert GraphRunner((1, 2), {"decode": True}, asked=("decode",)).fallback is None
    assert GraphRunner((1, 2), {}, asked=()).fallback is None  # the CPU: nothing asked, nothing refused
