"""The inspection graph: input_ids -> every activation under TransformerLens's names, for
`Engine.run_with_cache` (engine/activations.py has the names and what each one holds).

`activations` is the model's forward written out with each tensor TransformerLens hooks in
sight: LayerNorm in its steps (the scale and the normalized input are activations), attention
with its scores and pattern (no fused kernel), the MLP before and after its GELU. It is the
PyTorch reference of the export check and, traced, the graph (`inspect.onnx` beside
`model.onnx`). The graph stores no weights of its own: its matrices are the main graph's
initializers, pointing at the same bytes of `model.onnx.data` (only vectors, and a small model's
inline weights, are copied), so an inspectable folder costs the graph's few MB on disk. Positions
are 0..seq-1 and attention is causal over the whole row, as in TransformerLens's run_with_cache
(no padding mask: pad on the right).
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from gpt2onnx.engine.activations import LOGITS, graph_outputs
from gpt2onnx.engine.contract import UserError

from .graph import OPSET
from .model import GPT2
from .weights import Weights, is_placeholder, parameters_to_placeholders, write

log = logging.getLogger(__name__)

INSPECT_FILE = "inspect.onnx"
INSPECT_DTYPES = ("fp32", "fp16")  # quantized graphs have no float matrices to share
MASKED = torch.finfo(torch.float32).min  # TransformerLens's fill for a key after the query


class InspectError(UserError, ValueError):
    pass


def _layer_norm(ln, x: torch.Tensor, prefix: str, acts: dict) -> torch.Tensor:
    """TransformerLens's steps: scale = sqrt(var + eps); normalized = (x - mean) / scale (before the
    weight and bias); out = normalized * weight + bias. Statistics in float32."""
    x32 = x.float()
    centered = x32 - x32.mean(-1, keepdim=True)
    scale = (centered.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    normalized = (centered / scale).to(x.dtype)
    out = normalized * ln.weight + ln.bias
    acts[prefix + "hook_scale"], acts[prefix + "hook_normalized"], acts[prefix + "hook_out"] = (
        scale.to(x.dtype), normalized, out,
    )  # fmt: skip
    return out


def activations(model: GPT2, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every graph output of engine.activations.graph_outputs, in its order."""
    c = model.config
    B, T = input_ids.shape
    H, D = c.n_head, c.head_dim
    acts: dict[str, torch.Tensor] = {}
    acts["hook_embed"] = model.wte_t.index_select(1, input_ids.reshape(-1)).t().reshape(B, T, -1)
    positions = torch.arange(T, device=input_ids.device)
    acts["hook_pos_embed"] = model.wpe.index_select(0, positions).unsqueeze(0)  # (1, T, C)
    x = acts["blocks.0.hook_resid_pre"] = acts["hook_embed"] + acts["hook_pos_embed"]
    allowed = positions.unsqueeze(0) <= positions.unsqueeze(1)  # (query, key): keys up to the query
    for i, block in enumerate(model.h):
        p = f"blocks.{i}."
        h = _layer_norm(block.ln_1, x, p + "ln1.", acts)
        q, k, v = (t.reshape(B, T, H, D) for t in block.attn.c_attn(h).split(c.n_embd, dim=2))
        acts[p + "attn.hook_q"], acts[p + "attn.hook_k"], acts[p + "attn.hook_v"] = q, k, v
        scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)).float() * block.attn.scale  # (B, H, T, T)
        scores = acts[p + "attn.hook_attn_scores"] = scores.masked_fill(~allowed, MASKED)
        pattern = acts[p + "attn.hook_pattern"] = scores.softmax(dim=-1)
        z = acts[p + "attn.hook_z"] = (pattern.to(v.dtype) @ v.transpose(1, 2)).transpose(1, 2)
        attn_out = acts[p + "hook_attn_out"] = block.attn.c_proj(z.reshape(B, T, c.n_embd))
        x = acts[p + "hook_resid_mid"] = x + attn_out
        h = _layer_norm(block.ln_2, x, p + "ln2.", acts)
        pre = acts[p + "mlp.hook_pre"] = block.mlp.c_fc(h)
        post = acts[p + "mlp.hook_post"] = F.gelu(pre, approximate=block.mlp.approximate)
        mlp_out = acts[p + "hook_mlp_out"] = block.mlp.c_proj(post)
        x = acts[p + "hook_resid_post"] = x + mlp_out
    final = _layer_norm(model.ln_f, x, "ln_final.", acts)
    acts[LOGITS] = (final @ model.wte_t).float()
    assert list(acts) == graph_outputs(c.n_layer)
    return acts


class InspectGraph(nn.Module):
    """What tracing sees: `activations` as a forward that returns a tuple."""

    def __init__(self, model: GPT2):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return tuple(activations(self.model, input_ids).values())


def dynamic_axes(n_layer: int) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch", 1: "seq"}}
    for name in graph_outputs(n_layer):
        if name == "hook_pos_embed":
            axes[name] = {1: "seq"}
        elif name.endswith(("hook_attn_scores", "hook_pattern")):
            axes[name] = {0: "batch", 2: "seq", 3: "seq"}
        else:
            axes[name] = {0: "batch", 1: "seq"}
    return axes


def trace_inspect(model: GPT2) -> tuple[onnx.ModelProto, Weights]:
    """The inspection graph of `model` with placeholder weights (export/weights.py)."""
    n_layer = model.config.n_layer
    traced = InspectGraph(model)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            traced,
            (torch.zeros(2, 3, dtype=torch.long),),  # no dim of 0 or 1: tracing would specialise it
            buffer,
            dynamo=False,
            export_params=False,
            opset_version=OPSET,
            input_names=["input_ids"],
            output_names=graph_outputs(n_layer),
            dynamic_axes=dynamic_axes(n_layer),
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    return proto, parameters_to_placeholders(proto, traced)


def write_inspect(model: GPT2, path: Path, main: onnx.ModelProto, main_weights: Weights) -> None:
    """Trace `model` and write its inspection graph at `path`. Each matrix is the main graph's
    written initializer with the same bytes (`main`, as export_graph returned it): an external
    one is referenced where it lies, an inline one (a small model) is written inline again."""
    proto, weights = trace_inspect(model)
    by_address = {_address(a): name for name, a in main_weights.items()}
    written = {t.name: t for t in main.graph.initializer}
    own: Weights = {}
    for tensor in proto.graph.initializer:
        if not is_placeholder(tensor):
            continue
        array, name = weights[tensor.name], tensor.name
        source = written.get(by_address.get(_address(array)))
        if source is None or source.data_location != onnx.TensorProto.EXTERNAL or is_placeholder(source):
            own[name] = array  # inline in the main graph: inline here too
            continue
        if tuple(source.dims) != array.shape or source.data_type != tensor.data_type:
            raise InspectError(
                f"the inspection graph's {name} would read a {list(source.dims)} tensor for a "
                f"{list(array.shape)} weight; export without --inspect and report this"
            )
        tensor.CopyFrom(source)
        tensor.name = name
    log.info("writing %s (%d weights shared with %s)", path.name, len(weights) - len(own), _files(main))
    write(proto, own, path, None)


def _files(main: onnx.ModelProto) -> str:
    locations = {e.value for t in main.graph.initializer for e in t.external_data if e.key == "location"}
    return ", ".join(sorted(locations)) or "none (a small model: inline)"


def _address(array: np.ndarray) -> tuple[int, tuple[int, ...], str]:
    return array.__array_interface__["data"][0], array.shape, array.dtype.str


# (batch, seq) of the check: one token, a batch, a longer row.
INSPECT_CHECKS = ((1, 1), (3, 5), (1, 11))


def expected_activations(reference: GPT2) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The reference's activations on the check's random tokens: (input_ids, name -> array)."""
    rng = np.random.default_rng(0)
    cases = []
    for batch, seq in INSPECT_CHECKS:
        seq = min(seq, reference.config.n_positions)
        ids = rng.integers(0, reference.config.vocab_size, (batch, seq), dtype=np.int64)
        with torch.no_grad():
            acts = activations(reference, torch.from_numpy(ids))
        cases.append((ids, {name: t.float().numpy() for name, t in acts.items()}))
    return cases


def check_inspect(session, cases, dtype: str) -> float:
    """The inspection graph (an onnxruntime session) against the reference's activations: each
    output within the dtype's tolerance (verify.TOLERANCES) of its largest value; masked scores
    equal to MASKED exactly. Returns the largest error over its tensor's largest value."""
    from .verify import TOLERANCES, ExportCheckError

    tol, worst = TOLERANCES[dtype], 0.0
    for ids, want in cases:
        shape = ids.shape
        log.info("checking the inspection graph against PyTorch: (batch, seq) = %s", shape)
        got = dict(zip(want, session.run(list(want), {"input_ids": ids})))
        allowed = np.tril(np.ones((shape[1], shape[1]), bool))
        for name, w in want.items():
            g = got[name].astype(np.float32)
            if g.shape != w.shape or not np.isfinite(g).all():
                raise ExportCheckError(
                    f"inspection output {name} is {g.shape}, finite {bool(np.isfinite(g).all())}: expected "
                    f"{w.shape}, finite, at (batch, seq) = {shape}"
                )  # fmt: skip
            valid = allowed if name.endswith("hook_attn_scores") else np.ones((), bool)
            if name.endswith("hook_attn_scores") and not (g[..., ~allowed] == float(MASKED)).all():
                raise ExportCheckError(f"inspection output {name} is not {float(MASKED)} after the query")
            diff = np.abs(np.where(valid, g - w, 0)).max(initial=0.0)
            largest = float(np.abs(np.where(valid, w, 0)).max(initial=0.0))
            if diff > tol.atol + tol.rtol * largest:
                raise ExportCheckError(
                    f"inspection output {name} differs from PyTorch by {diff:.3g} (limit "
                    f"{tol.atol + tol.rtol * largest:.3g}) at (batch, seq) = {shape}"
                )
            worst = max(worst, float(diff) / max(largest, 1e-30))
    return worst
