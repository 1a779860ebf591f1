"""Serving: the OpenAI-compatible HTTP server over the engine's scheduler (server.py), the
mapping between OpenAI's completions API and the engine (openai_api.py), Prometheus text metrics
(metrics.py), replicas on Ray Serve (ray_serve.py) and the `gpt2-onnx serve` command (cli.py).

Needs the [serve] extra (fastapi, uvicorn); `--ray` needs the [ray] extra. Imported only by the
command and by apps that serve: `import gpt2onnx` never loads a web framework.
"""
