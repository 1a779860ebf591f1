"""TransformerLens's names for GPT-2's activations, and the cache `Engine.run_with_cache` returns.

The inspection graph (export/inspect.py) has one output per distinct tensor, named after
TransformerLens's canonical hook (`blocks.0.attn.hook_pattern`). TransformerLens's
TransformerBridge caches each tensor under more names than that (`blocks.0.hook_in` is
`blocks.0.hook_resid_pre`, `blocks.1.hook_resid_pre` is `blocks.0.hook_resid_post`,
`blocks.0.attn.o.hook_out` is `blocks.0.hook_attn_out`, ...): `SOURCES` maps every name of the
bridge's GPT-2 cache to the graph output it reads, so a cache asked for by any of them costs one
output of the graph. The names, their values and their shapes were read off TransformerLens 4.3's
bridge (`TransformerBridge.boot_transformers`, no compatibility mode) on a GPT-2 folder:

    hook_embed, hook_pos_embed, blocks.{i}.hook_resid_pre      (batch, pos, d_model)
    ln*.hook_scale (batch, pos, 1): sqrt(var + eps)   ln*.hook_normalized: (x - mean) / scale,
        before the LayerNorm's weight and bias (ln*.hook_out is after them)
    attn.hook_q/k/v/z                                          (batch, pos, head, d_head)
    attn.hook_attn_scores, attn.hook_pattern                   (batch, head, query, key)
        scores: q.k scaled, masked (key after query) with float32's lowest value, -3.4e38
    mlp.hook_pre, mlp.hook_post                                (batch, pos, d_mlp)
    hook_attn_out, hook_resid_mid, hook_mlp_out, hook_resid_post (batch, pos, d_model)
    ln_final.hook_scale, ln_final.hook_normalized; hook_unembed = the logits (batch, pos, vocab)
    embed.hook_in: the tokens (batch, pos); pos_embed.hook_in: the positions (1, pos)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from .contract import InputError

TOKENS, POSITIONS = "<tokens>", "<positions>"  # sources that are the call's inputs, not graph outputs
LOGITS = "logits"

# A block's graph outputs, in the order the block computes them (blocks.0 also has hook_resid_pre).
BLOCK_OUTPUTS = (
    "ln1.hook_scale", "ln1.hook_normalized", "ln1.hook_out", "attn.hook_q", "attn.hook_k", "attn.hook_v",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
    "ln2.hook_scale", "ln2.hook_normalized", "ln2.hook_out", "mlp.hook_pre", "mlp.hook_post",
    "hook_mlp_out", "hook_resid_post",
)  # fmt: skip
FINAL_OUTPUTS = ("ln_final.hook_scale", "ln_final.hook_normalized", "ln_final.hook_out", LOGITS)

# A block's names in the bridge's cache, in its order: name -> the block's graph output it reads.
BLOCK_NAMES = {
    "hook_in": "hook_resid_pre", "hook_resid_pre": "hook_resid_pre",
    "ln1.hook_in": "hook_resid_pre", "ln1.hook_scale": "ln1.hook_scale",
    "ln1.hook_normalized": "ln1.hook_normalized", "ln1.hook_out": "ln1.hook_out",
    "attn.hook_in": "ln1.hook_out",
    "attn.q.hook_in": "ln1.hook_out", "attn.q.hook_out": "attn.hook_q", "attn.hook_q": "attn.hook_q",
    "attn.k.hook_in": "ln1.hook_out", "attn.k.hook_out": "attn.hook_k", "attn.hook_k": "attn.hook_k",
    "attn.v.hook_in": "ln1.hook_out", "attn.v.hook_out": "attn.hook_v", "attn.hook_v": "attn.hook_v",
    "attn.hook_attn_scores": "attn.hook_attn_scores", "attn.hook_pattern": "attn.hook_pattern",
    "attn.o.hook_in": "attn.hook_z", "attn.hook_z": "attn.hook_z",
    "attn.o.hook_out": "hook_attn_out", "attn.hook_hidden_states": "hook_attn_out",
    "attn.hook_out": "hook_attn_out", "hook_attn_out": "hook_attn_out",
    "ln2.hook_in": "hook_resid_mid", "hook_resid_mid": "hook_resid_mid",
    "ln2.hook_scale": "ln2.hook_scale", "ln2.hook_normalized": "ln2.hook_normalized",
    "ln2.hook_out": "ln2.hook_out",
    "mlp.hook_in": "ln2.hook_out", "mlp.in.hook_in": "ln2.hook_out",
    "mlp.in.hook_out": "mlp.hook_pre", "mlp.hook_pre": "mlp.hook_pre",
    "mlp.out.hook_in": "mlp.hook_post", "mlp.hook_post": "mlp.hook_post",
    "mlp.out.hook_out": "hook_mlp_out", "mlp.hook_out": "hook_mlp_out", "hook_mlp_out": "hook_mlp_out",
    "hook_out": "hook_resid_post", "hook_resid_post": "hook_resid_post",
}  # fmt: skip


# TransformerLens's canonical names (HookedTransformer's; the bridge keeps them beside its aliases).
CANONICAL_BLOCK = (
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
    "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out",
    "hook_resid_post",
)  # fmt: skip


def canonical_names(n_layer: int) -> list[str]:
    """hook_embed, hook_pos_embed, every block's CANONICAL_BLOCK, ln_final's scale and normalized."""
    names = ["hook_embed", "hook_pos_embed"]
    for i in range(n_layer):
        names += [f"blocks.{i}.{name}" for name in CANONICAL_BLOCK]
    return names + ["ln_final.hook_scale", "ln_final.hook_normalized"]


def graph_outputs(n_layer: int) -> list[str]:
    """The inspection graph's outputs, in order: one per distinct tensor."""
    names = ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"]
    for i in range(n_layer):
        names += [f"blocks.{i}.{name}" for name in BLOCK_OUTPUTS]
    return names + list(FINAL_OUTPUTS)


def sources(n_layer: int) -> dict[str, str]:
    """Every name of the cache -> the graph output (or TOKENS / POSITIONS) holding its value."""
    last = f"blocks.{n_layer - 1}.hook_resid_post"
    table = {
        "embed.hook_in": TOKENS, "embed.hook_out": "hook_embed", "hook_embed": "hook_embed",
        "pos_embed.hook_in": POSITIONS, "pos_embed.hook_out": "hook_pos_embed",
        "hook_pos_embed": "hook_pos_embed",
    }  # fmt: skip
    for i in range(n_layer):
        for name, output in BLOCK_NAMES.items():
            if output == "hook_resid_pre" and i > 0:  # the residual stream between blocks is one tensor
                table[f"blocks.{i}.{name}"] = f"blocks.{i - 1}.hook_resid_post"
            else:
                table[f"blocks.{i}.{name}"] = f"blocks.{i}.{output}"
    table |= {"ln_final.hook_in": last}
    table |= {f"ln_final.{n}": f"ln_final.{n}" for n in ("hook_scale", "hook_normalized", "hook_out")}
    table |= {"unembed.hook_in": "ln_final.hook_out", "unembed.hook_out": LOGITS, "hook_unembed": LOGITS}
    return table


NamesFilter = str | Sequence[str] | Callable[[str], bool] | None


def select(names_filter: NamesFilter, n_layer: int) -> list[str]:
    """The cache's names that `names_filter` asks for, as TransformerLens reads it: None for all,
    one name, a list of names, or a predicate called with each name. A name that is not in the
    cache is refused (TransformerLens would return a cache without it)."""
    every = sources(n_layer)
    if names_filter is None:
        return list(every)
    if callable(names_filter):
        return [name for name in every if names_filter(name)]
    asked = [names_filter] if isinstance(names_filter, str) else names_filter
    if not isinstance(asked, (list, tuple)) or not all(isinstance(n, str) for n in asked):
        raise InputError(
            f"names_filter is {type(names_filter).__name__}; pass None, a name, a list of names or a "
            "function of a name that returns a bool",
            param="names_filter",
        )
    for name in asked:
        if name not in every:
            close = difflib.get_close_matches(name, every, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(
                f"names_filter asks for {name!r}, which is not an activation of this {n_layer}-layer "
                f"model{hint}; the names are TransformerLens's, such as 'blocks.0.attn.hook_pattern'",
                param="names_filter",
            )
    return list(dict.fromkeys(asked))


# TransformerLens's short names (its utilities.get_act_name), for cache["pattern", 0].
ATTN_SHORT = ("q", "k", "v", "z", "pattern", "attn_scores")
MLP_SHORT = ("pre", "post")
SHORT_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "query": "q", "key": "k",
                 "value": "v", "mlp_pre": "pre", "mlp_post": "post"}  # fmt: skip
LAYER_TYPES = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """A short name to the full one, as TransformerLens spells them: ("pattern", 0) ->
    "blocks.0.attn.hook_pattern", ("scale", 2, "ln1") -> "blocks.2.ln1.hook_scale", ("scale",) ->
    "ln_final.hook_scale", ("resid_post", 11) -> "blocks.11.hook_resid_post"."""
    if layer is None and layer_type is None and ("." in name or name.startswith("hook_")):
        return name
    name = SHORT_ALIASES.get(name, name)
    if name in ATTN_SHORT:
        layer_type = "attn"
    elif name in MLP_SHORT:
        layer_type = "mlp"
    else:
        layer_type = LAYER_TYPES.get(layer_type, layer_type)
    full = (f"blocks.{layer}." if layer is not None else "") + (f"{layer_type}." if layer_type else "")
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


class ActivationCache(Mapping):
    """name -> numpy array, TransformerLens's names and shapes. Besides cache["blocks.0.hook_q"],
    cache["q", 0] (short name and layer; negative layers count from the last), cache["scale", 3,
    "ln2"] and cache["resid_post", -1] work as in TransformerLens's ActivationCache."""

    def __init__(self, arrays: dict[str, np.ndarray], n_layer: int):
        self._arrays, self.n_layer = arrays, n_layer

    def _name(self, key) -> str:
        if isinstance(key, str):
            return act_name(key)  # a full name as it is; "embed" -> "hook_embed", "scale" -> ln_final's
        if isinstance(key, tuple) and key and isinstance(key[0], str) and len(key) <= 3:
            layer = key[1] if len(key) > 1 else None
            if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
                if not -self.n_layer <= layer < self.n_layer:
                    raise KeyError(f"layer {layer} of a {self.n_layer}-layer model")
                layer = int(layer) % self.n_layer
            elif layer is not None:
                raise KeyError(f"{key!r}: the layer must be an int")
            return act_name(key[0], layer, key[2] if len(key) > 2 else None)
        raise KeyError(f"{key!r}: use a name such as 'blocks.0.attn.hook_pattern' or ('pattern', 0)")

    def __getitem__(self, key) -> np.ndarray:
        name = self._name(key)
        if name not in self._arrays:
            raise KeyError(
                f"{name!r} is not in this cache; it holds {len(self._arrays)} names"
                + (" (run_with_cache's names_filter chose them)" if self._arrays else "")
            )
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations of a {self.n_layer}-layer GPT-2)"
