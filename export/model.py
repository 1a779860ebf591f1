"""A small, explicit GPT-2 in PyTorch, written for export to ONNX.

Why our own module and not transformers' GPT2LMHeadModel: tracing transformers bakes
shape-dependent branches of its mask code into the graph. This module has no branches on
shapes: the causal + padding mask is built from tensor shapes once per call, the KV cache is
a plain concat (or, traced for the shared cache, onnxruntime's in-place GroupQueryAttention), and
every dim the graph needs stays symbolic.

Weights follow the checkpoint's layout (GPT-2's Conv1D stores (in, out)), so they load
without transposes. The tied embedding is stored once, as `wte_t` (n_embd, vocab): the
lm_head is a plain MatMul on it and the token embedding is a Gather along its axis 1 (int8
exports give the Gather a row-major 8-bit table: see untie_embedding).

fp16 safety: LayerNorm statistics (ONNX stash_type=1), the attention softmax and the final
logits run in float32; the mask is a finite large negative (a fully masked row, such as a
left-padding query, gives a uniform softmax instead of NaN); queries are scaled before Q·Kᵀ so
scores stay small. The fused MultiHeadAttention op keeps the same rules (float32 softmax,
finite mask_filter_value).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2onnx.engine.contract import GPT2Config

MASK_VALUE = -1e9  # applied in float32 after the scores are upcast, so never overflows


class LayerNorm(nn.Module):
    def __init__(self, n_embd: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))
        self.shape, self.eps = (n_embd,), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ONNX LayerNormalization keeps its statistics in float32 (stash_type=1) for fp16 inputs,
        # so no casts are needed here, and none stand in the way of SkipLayerNormalization fusion.
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class Linear(nn.Module):
    """GPT-2's Conv1D: y = x @ W + b with W stored (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def allowed_mask(seq: int, past_len, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, seq, past_len + seq) bool: query i sits at slot past_len + i and may see slots
    j <= past_len + i that the attention mask marks as real tokens."""
    q_slot = torch.arange(seq, device=attention_mask.device).unsqueeze(1) + past_len  # (seq, 1)
    k_slot = torch.arange(past_len + seq, device=attention_mask.device).unsqueeze(0)  # (1, total_seq)
    return (k_slot <= q_slot) & attention_mask.bool()[:, None, None, :]


def attend(q, k, v, past_k, past_v, allowed, n_head: int, scale: float):
    """q, k, v (B, T, C) -> y (B, T, C) and the caches (B, n_head, total_seq, head_dim)."""
    B, T, C = q.shape
    q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
    k = torch.cat([past_k, k], dim=2)
    v = torch.cat([past_v, v], dim=2)
    scores = ((q * scale) @ k.transpose(-2, -1)).float()  # (B, n_head, T, total_seq)
    probs = scores.masked_fill(~allowed, MASK_VALUE).softmax(dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2).reshape(B, T, C), k, v


class FusedAttention(torch.autograd.Function):
    """Exports as onnxruntime's com.microsoft::MultiHeadAttention (causal, 2-D padding mask,
    BNSH past/present): one kernel instead of ~20 small ops per layer. Runs `attend` in PyTorch."""

    @staticmethod
    def forward(ctx, q, k, v, mask, past_k, past_v, n_head: int, scale: float):
        allowed = allowed_mask(q.shape[1], past_k.shape[2], mask)
        return attend(q, k, v, past_k, past_v, allowed, n_head, scale)

    @staticmethod
    def symbolic(g, q, k, v, mask, past_k, past_v, n_head, scale):
        from torch.onnx._internal.torchscript_exporter.symbolic_helper import (
            _optional_input_placeholder_tensor,
        )

        none = _optional_input_placeholder_tensor(g)
        mask32 = g.op("Cast", mask, to_i=6)  # int32, as the op wants
        y, k_all, v_all = g.op(
            "com.microsoft::MultiHeadAttention", q, k, v, none, mask32, none, past_k, past_v,
            num_heads_i=n_head, scale_f=scale, unidirectional_i=1, outputs=3,
        )  # fmt: skip
        y.setType(q.type())
        k_all.setType(past_k.type())
        v_all.setType(past_v.type())
        return y, k_all, v_all


class SharedCacheAttention(torch.autograd.Function):
    """Exports as onnxruntime's com.microsoft::GroupQueryAttention (kv_num_heads = num_heads, no
    rotary): past and present are one (batch, n_head, max_seq, head_dim) buffer that the op
    updates in place at each row's own length (seqlens_k). It takes c_attn's output as one packed
    (B, T, 3C) query (no Split node; key and value inputs left empty). Its PyTorch side only gives
    tracing the output shapes; the export check runs the graph against `attend` through the engine."""

    @staticmethod
    def forward(ctx, qkv, past_k, past_v, seqlens_k, total_len, n_head: int, scale: float):
        return qkv[..., : qkv.shape[-1] // 3].clone(), past_k.clone(), past_v.clone()

    @staticmethod
    def symbolic(g, qkv, past_k, past_v, seqlens_k, total_len, n_head, scale):
        from torch.onnx._internal.torchscript_exporter.symbolic_helper import (
            _optional_input_placeholder_tensor,
        )

        none = _optional_input_placeholder_tensor(g)
        y, k_all, v_all = g.op(
            "com.microsoft::GroupQueryAttention", qkv, none, none, past_k, past_v, seqlens_k, total_len,
            num_heads_i=n_head, kv_num_heads_i=n_head, scale_f=scale, outputs=3,
        )  # fmt: skip
        y.setType(qkv.type().with_sizes([None, None, None]))
        k_all.setType(past_k.type())
        v_all.setType(past_v.type())
        return y, k_all, v_all


ATTENTION_KINDS = (
    "plain",
    "mha",
    "gqa",
)  # standard ops | MultiHeadAttention | GroupQueryAttention, shared cache


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        scale = 1.0 / math.sqrt(config.head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        self.kind = "plain"  # set by GPT2.use_attention() before export

    def forward(self, x, masks: tuple, past_k, past_v):
        """masks: (allowed, attention_mask) for plain / mha, (seqlens_k, total_len) for gqa."""
        qkv = self.c_attn(x)
        if self.kind == "gqa":  # takes the packed qkv
            y, k, v = SharedCacheAttention.apply(qkv, past_k, past_v, *masks, self.n_head, self.scale)
        else:
            q, k, v = qkv.split(x.shape[-1], dim=2)
            if self.kind == "mha":
                y, k, v = FusedAttention.apply(q, k, v, masks[1], past_k, past_v, self.n_head, self.scale)
            else:
                y, k, v = attend(q, k, v, past_k, past_v, masks[0], self.n_head, self.scale)
        return self.c_proj(y), k, v


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_dim)
        self.c_proj = Linear(config.mlp_dim, config.n_embd)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, masks, past_k, past_v):
        a, k, v = self.attn(self.ln_1(x), masks, past_k, past_v)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, k, v


class GPT2(nn.Module):
    """forward(input_ids, position_ids, attention_mask, logits_to_keep, *past) -> (logits, *present);
    forward_shared(...) is the shared-cache graph. See gpt2onnx.engine.contract for shapes.
    `past` is flat: key_0, value_0, key_1, ...
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte_t = nn.Parameter(torch.empty(config.n_embd, config.vocab_size))  # tied, (C, V)
        self.wte = None  # the Gather's own (vocab, C) table, quantized graphs only (untie_embedding)
        self.wpe = nn.Parameter(torch.empty(config.n_positions, config.n_embd))
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)

    def forward(self, input_ids, position_ids, attention_mask, logits_to_keep, *past):
        T = input_ids.shape[1]
        masks = (
            None if self.h[0].attn.kind == "mha" else allowed_mask(T, past[0].shape[2], attention_mask),
            attention_mask,
        )
        x, presents = self._blocks(input_ids, position_ids, masks, past)
        x = x[:, T - logits_to_keep :, :]  # (B, kept, C)
        return (self._lm_head(x), *presents)

    def forward_shared(self, input_ids, position_ids, seqlens_k, total_len, logits_index, *past):
        """The shared-cache graph (contract "shared"): GroupQueryAttention updates `past` in place."""
        x, presents = self._blocks(input_ids, position_ids, (seqlens_k, total_len), past)
        idx = logits_index.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, kept, C)
        logits = self._lm_head(torch.gather(x, 1, idx))
        return (logits, logits.argmax(dim=-1), *presents)

    def _blocks(self, input_ids, position_ids, masks, past):
        B, T = input_ids.shape
        if self.wte is None:
            tok = self.wte_t.index_select(1, input_ids.reshape(-1)).t().reshape(B, T, -1)
        else:
            tok = self.wte[input_ids]
        x = tok + self.wpe.index_select(0, position_ids.reshape(-1)).reshape(B, T, -1)
        presents = []
        for i, block in enumerate(self.h):
            x, k, v = block(x, masks, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return self.ln_f(x), presents

    def _lm_head(self, x):
        return (x @ self.wte_t).float()  # (B, kept, vocab)

    def untie_embedding(self) -> None:
        """Give the token Gather its own (vocab, C) table, for tracing a quantized graph: the
        lm_head's wte_t becomes low-bit blocks there, and the Gather reads 8-bit rows of its own
        (quantize.embedding_from_8bit), one contiguous row a token instead of n_embd values a vocab
        apart (86 -> 27 us a step on our CPU). Here a view of wte_t: tracing needs no copy."""
        self.wte = nn.Parameter(self.wte_t.detach().t())

    def use_attention(self, kind: str) -> None:
        """How attention is traced: one of ATTENTION_KINDS."""
        assert kind in ATTENTION_KINDS, kind
        for block in self.h:
            block.attn.kind = kind


class SharedCacheGraph(nn.Module):
    """What tracing sees for the shared-cache graph: GPT2.forward_shared as a forward."""

    def __init__(self, model: GPT2):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model.forward_shared(*args)
