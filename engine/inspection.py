"""`Engine.run_with_cache`'s runner: the inspection graph (export --inspect) on onnxruntime.

The session is made at the first call, not at load (an engine that never inspects pays nothing),
and is this module's alone: it runs beside the engine's decode session without its lock. It
holds a second copy of the weights in memory while the engine lives. Only the graph outputs the
asked names need are fetched: onnxruntime computes the whole forward either way (it is the
logits' forward, with attention unfused), so a filtered call costs the logits plus the copies.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .activations import LOGITS, POSITIONS, TOKENS, ActivationCache, NamesFilter, select, sources
from .contract import InputError, Manifest, ModelFolderError
from .runtime import create_session

MAX_CACHE_BYTES = 1 << 32  # 4 GiB: what one run_with_cache may return


def export_command(manifest: Manifest) -> str:
    """The export command that makes an inspectable folder from the same weights."""
    src = manifest.source
    if src.random_init:
        size = src.checkpoint.removeprefix("random-init:")
        origin = f"--random-init {size}" + (f" --seed {src.seed}" if src.seed else "")
    else:
        origin = f"--model {src.checkpoint}"
    dtype = manifest.dtype if manifest.dtype in ("fp32", "fp16") else "fp32"
    return f"gpt2-onnx export {origin} --dtype {dtype} --inspect --output DIR"


class Inspector:
    def __init__(self, folder: Path, manifest: Manifest, device: str, threads: int | None):
        self.folder, self.manifest, self.device, self.threads = folder, manifest, device, threads
        self._session = None
        self._made = threading.Lock()

    def session(self):
        if self.manifest.inspect_file is None:
            raise ModelFolderError(
                f"{self.folder} cannot inspect: it was exported without --inspect"
                + (f" (and is {self.manifest.dtype}: only fp32 and fp16 inspect)"
                   if self.manifest.dtype not in ("fp32", "fp16") else "")
                + f"; export an inspectable folder from the same weights: {export_command(self.manifest)}"
            )  # fmt: skip
        with self._made:
            if self._session is None:
                path = self.folder / self.manifest.inspect_file
                self._session = create_session(path, self.device, self.threads)[0]
        return self._session

    def run(self, ids: np.ndarray, names_filter: NamesFilter) -> tuple[np.ndarray, ActivationCache]:
        """Logits (batch, seq, vocab) and the cache of the names `names_filter` selects."""
        session = self.session()
        c = self.manifest.config
        names = select(names_filter, c.n_layer)
        table = sources(c.n_layer)
        outputs = list(dict.fromkeys(table[n] for n in names if table[n] not in (TOKENS, POSITIONS)))
        outputs = [LOGITS] + [o for o in outputs if o != LOGITS]
        self._check_size(ids.shape, outputs)
        got = dict(zip(outputs, session.run(outputs, {"input_ids": ids})))
        batch, seq = ids.shape
        got[TOKENS], got[POSITIONS] = ids, np.arange(seq, dtype=np.int64)[None]
        if "hook_pos_embed" in got:  # the graph gives (1, seq, d_model); TransformerLens's has the batch
            got["hook_pos_embed"] = np.ascontiguousarray(
                np.broadcast_to(got["hook_pos_embed"], (batch, seq, c.n_embd))
            )
        return got[LOGITS], ActivationCache({n: got[table[n]] for n in names}, c.n_layer)

    def _check_size(self, shape: tuple[int, int], outputs: list[str]) -> None:
        batch, seq = shape
        c = self.manifest.config
        per_position = {
            "hook_scale": 1, "hook_attn_scores": c.n_head * seq, "hook_pattern": c.n_head * seq,
            "hook_pre": c.mlp_dim, "hook_post": c.mlp_dim, LOGITS: c.vocab_size,
        }  # fmt: skip
        floats = sum(batch * seq * per_position.get(o.rsplit(".", 1)[-1], c.n_embd) for o in outputs)
        if floats * 4 > MAX_CACHE_BYTES:
            raise InputError(
                f"tokens of {batch} x {seq} ids would return {floats * 4 / 2**30:.1f} GiB of activations, "
                f"more than {MAX_CACHE_BYTES / 2**30:.0f} GiB; pass fewer rows, or a names_filter",
                param="tokens",
            )
