"""`python -m gpt2onnx ...`: the `gpt2-onnx` command without its console script."""

import sys

from gpt2onnx.cli import main

sys.exit(main())
