"""A small, explicit GPT-2 in PyTorch, written for export to ONNX.

Why our own module and not transformers' GPT2LMHeadModel: tracing transformers bakes
shape-dependent branches of its mask code into the graph. This module has no branches on
shapes: the causal + padding mask is built from tensor shapes once per call, the KV cache is
a plain concat, and every dim the graph needs stays symbolic.

Weights follow the checkpoint's layout (GPT-2's Conv1D stores (in, out)), so they load
without transposes. The tied embedding is stored once, as `wte_t` (n_embd, vocab): the
lm_head is a plain MatMul on it and the token embedding is a Gather along its axis 1.

fp16 safety: LayerNorm, the attention softmax and the final logits run in float32; the mask
is a finite large negative (a fully masked row, such as a left-padding query, gives a uniform
softmax instead of NaN); queries are scaled before Q·Kᵀ so scores stay small.
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
        y = F.layer_norm(x.float(), self.shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class Linear(nn.Module):
    """GPT-2's Conv1D: y = x @ W + b with W stored (in, out)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        scale = 1.0 / math.sqrt(self.head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale

    def forward(self, x, allowed, past_k, past_v):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        k = torch.cat([past_k, k], dim=2)  # (B, n_head, total_seq, head_dim)
        v = torch.cat([past_v, v], dim=2)
        scores = ((q * self.scale) @ k.transpose(-2, -1)).float()  # (B, n_head, T, total_seq)
        probs = scores.masked_fill(~allowed, MASK_VALUE).softmax(dim=-1).to(v.dtype)
        y = (probs @ v).transpose(1, 2).reshape(B, T, C)
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

    def forward(self, x, allowed, past_k, past_v):
        a, k, v = self.attn(self.ln_1(x), allowed, past_k, past_v)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, k, v


class GPT2(nn.Module):
    """forward(input_ids, position_ids, attention_mask, logits_to_keep, *past) -> (logits, *present).

    See gpt2onnx.engine.contract for shapes. `past` is flat: key_0, value_0, key_1, ...
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte_t = nn.Parameter(torch.empty(config.n_embd, config.vocab_size))  # tied, (C, V)
        self.wpe = nn.Parameter(torch.empty(config.n_positions, config.n_embd))
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)

    def forward(self, input_ids, position_ids, attention_mask, logits_to_keep, *past):
        B, T = input_ids.shape
        past_len = past[0].shape[2]
        tok = self.wte_t.index_select(1, input_ids.reshape(-1)).t().reshape(B, T, -1)
        x = tok + self.wpe.index_select(0, position_ids.reshape(-1)).reshape(B, T, -1)

        # Query i sits at absolute slot past_len + i and may see slots j <= past_len + i that
        # the attention mask marks as real tokens.
        q_slot = torch.arange(T, device=x.device).unsqueeze(1) + past_len  # (T, 1)
        k_slot = torch.arange(past_len + T, device=x.device).unsqueeze(0)  # (1, total_seq)
        allowed = (k_slot <= q_slot) & attention_mask.bool()[:, None, None, :]  # (B, 1, T, total_seq)

        presents = []
        for i, block in enumerate(self.h):
            x, k, v = block(x, allowed, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        x = self.ln_f(x)
        x = x[:, T - logits_to_keep :, :]  # (B, kept, C)
        logits = (x @ self.wte_t).float()  # (B, kept, vocab)
        return (logits, *presents)

    def empty_past(self, batch: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        c = self.config
        dtype = dtype or self.wpe.dtype
        return [torch.zeros(batch, c.n_head, 0, c.head_dim, dtype=dtype) for _ in range(2 * c.n_layer)]
