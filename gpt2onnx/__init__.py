"""gpt2-onnx: GPT-2 on ONNX Runtime. The public API:

    from gpt2onnx import Engine
    engine = Engine.load("models/gpt2-fp32")
    print(engine.generate("Hello", max_new_tokens=20).completions[0].text)

Packages, each importing only those below it: `gpt2onnx.engine` (the model folder contract, the
session, sampling, tokenization, the decode loop, `Engine`), `gpt2onnx.export` (checkpoint ->
model folder), `gpt2onnx.benchmarks`, and at the top the `gpt2-onnx` command (gpt2onnx/cli.py).
"""

from gpt2onnx.engine.contract import InputError, ModelFolderError, UserError
from gpt2onnx.engine.engine import Completion, Engine, EngineBusyError, Generation, Score
from gpt2onnx.engine.runtime import ProviderError
from gpt2onnx.engine.sampling import SamplingConfig
from gpt2onnx.engine.session import SessionConfig

__all__ = [
    "Completion", "Engine", "EngineBusyError", "Generation", "InputError", "ModelFolderError",
    "ProviderError", "SamplingConfig", "Score", "SessionConfig", "UserError",
]  # fmt: skip
