"""The Llama 2 architecture, as Meta's reference ``llama/model.py`` defines it.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` (without its ``model.``
prefix), except that q/k/v and gate/up are held as one matrix each (``qkv_proj``,
``gate_up_proj``: one matmul instead of three and two, as gpt-fast does); ``llamita.layout`` maps
them to the checkpoints' separate names. q/k weights are kept in HF's rotate-half rotary layout:
Meta/GGUF weights are permuted once, at load time.

The model holds nothing but its weights: a caller passes the positions, the attention mask, a
function that stores and returns keys and values (``kv``), and where it wants logits; whatever
replaces a linear layer is a module like it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamita.config import Config

# (layer index, new keys, new values) -> the keys and values to attend over; see llamita.cache.
KVUpdate = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the model's dtype, as the reference does.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin, float32 [*positions.shape, head_dim], for the rotate-half layout: with
    halves (x1, x2), rotated = x * cos + (x2, x1) * (-sin, sin). Computed for the positions given
    rather than looked up in a table for the declared context, which a config can make any size."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, T, H, D] by position; in float32 like Meta's complex multiply."""
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, c: Config, index: int):
        super().__init__()
        self.index = index  # which layer's keys and values ``kv`` stores
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.qkv_proj = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kv: KVUpdate | None) -> Tensor:
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.head_dim)
        q, k = apply_rope(qkv[:, :, : H + Hkv], cos, sin).split([H, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), qkv[:, :, H + Hkv :].transpose(1, 2)
        if kv is not None:
            k, v = kv(self.index, k, v)
        # Grouped-query attention: each kv head serves n_heads / n_kv_heads query heads. With a mask,
        # CUDA's fused kernels take no enable_gqa (SDPA would fall back to its [B, H, T, S] math kernel).
        gqa = Hkv != H
        if gqa and mask is not None and q.is_cuda:
            k, v, gqa = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(c.dim, 2 * c.hidden_dim, bias=False)
        self.down_proj = nn.Linear(c.hidden_dim, c.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: Config, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c, index)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = FeedForward(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kv: KVUpdate | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output layer when the config says so (again after loading)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, *, mask: Tensor | None = None,
                kv: KVUpdate | None = None, logits_at: Tensor | None = None) -> Tensor:
        """Logits [B, T, vocab] for ``input_ids`` [B, T].

        ``positions`` ([T] or [B, T], default 0..T-1) place each token for the rotary embedding.
        ``mask`` (bool, [B, 1, T, keys]) says which keys each token sees; None: causal over the
        tokens given (a prompt from position 0, or a batch of whole sequences).
        ``kv`` stores each layer's new keys and values and returns those to attend over (a KV
        cache's ``step``); without it a token sees only the tokens given.
        ``logits_at`` (bool [B, T]) keeps only those positions: logits [N, vocab], row by row.
        """
        T = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        cos, sin = rope(positions.to(input_ids.device), self.config.head_dim, self.config.rope_theta)
        cos, sin = cos[..., None, :], sin[..., None, :]  # [(B,) T, 1, D]
        # A no-op unless the embedding is held in another dtype than the body (16-bit under float32).
        x = self.embed_tokens(input_ids).to(self.norm.weight.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, kv)
        if logits_at is not None:
            x = x[logits_at]
        return self.lm_head(self.norm(x))
