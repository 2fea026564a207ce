"""The Llama 2 architecture, as Meta's reference ``llama/model.py`` defines it.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` (without its ``model.``
prefix), and q/k weights are kept in its rotate-half rotary layout: HF checkpoints and PEFT
adapters then map one to one, and Meta/GGUF weights are permuted once, at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamita.config import Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the model's dtype, as the reference does.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_table(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos and signed sin, float32 [max_seq_len, head_dim], for the rotate-half layout: with
    halves (x1, x2), rotated = x * cos + (x2, x1) * (-sin, sin)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, T, H, D] by position; in float32 like Meta's complex multiply."""
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), sin).type_as(x)


class KVCache(nn.Module):
    """Keys and values per batch row; each row writes at its own positions."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, length: int,
               rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """Store k, v [B, Hkv, T, D] at input_pos [B, T] in cache ``rows`` (default: the first B);
        return those rows' first ``length`` slots."""
        B = k.shape[0]
        if rows is None and B == 1:  # one sequence (plain generation): a copy along positions
            self.k[:1].index_copy_(2, input_pos[0], k)
            self.v[:1].index_copy_(2, input_pos[0], v)
            return self.k[:1, :, :length], self.v[:1, :, :length]
        index = rows[:, None] if rows is not None else torch.arange(B, device=k.device)[:, None]
        # Advanced indices around a slice put the indexed dims first: [B, T, Hkv, D].
        self.k[index, :, input_pos] = k.transpose(1, 2)
        self.v[index, :, input_pos] = v.transpose(1, 2)
        if rows is None:  # a slice, not a copy: the decode path of a full batch
            return self.k[:B, :, :length], self.v[:B, :, :length]
        return self.k[rows, :, :length], self.v[rows, :, :length]


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one matmul, set by quantize.replace_linears
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor | None,
                length: int, cache_rows: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D)
            q, k = apply_rope(qkv[:, :, : H + Hkv], cos, sin).split([H, Hkv], dim=2)
            v = qkv[:, :, H + Hkv :]
        else:
            q = apply_rope(self.q_proj(x).view(B, T, H, D), cos, sin)
            k = apply_rope(self.k_proj(x).view(B, T, Hkv, D), cos, sin)
            v = self.v_proj(x).view(B, T, Hkv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, length, cache_rows)
        # Grouped-query attention: each kv head serves n_heads / n_kv_heads query heads.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.up_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.down_proj = nn.Linear(c.hidden_dim, c.dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matmul, set by quantize.replace_linears

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = FeedForward(c)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, mask: Tensor | None,
                length: int, cache_rows: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, length, cache_rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        self._rope: tuple[Tensor, Tensor] | None = None

    def tie_weights(self) -> None:
        """Share the embedding with the output layer when the config says so (again after loading)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None) -> None:
        """Allocate a KV cache; from then on ``forward`` needs ``input_pos``."""
        c = self.config
        max_seq_len = max_seq_len or c.max_seq_len
        w = self.norm.weight  # the body's dtype, which may differ from the embedding's (quantize_int4)
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, c.n_kv_heads, max_seq_len, c.head_dim, w.dtype, w.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    @property
    def has_cache(self) -> bool:
        return self.layers[0].self_attn.kv_cache is not None

    @property
    def cache_size(self) -> int:
        return self.layers[0].self_attn.kv_cache.k.shape[2]

    def _rope_table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._rope is None or self._rope[0].device != device:
            c = self.config
            self._rope = rope_table(c.head_dim, c.max_seq_len, c.rope_theta, device)
        return self._rope

    def forward(self, input_ids: Tensor, input_pos: Tensor | None = None, logits_at: Tensor | None = None,
                cache_rows: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """Logits [B, T, vocab] for ``input_ids`` [B, T].

        ``input_pos`` ([T] or [B, T]) gives each token's position; with a KV cache it is also the
        slot the token is written to, so rows of a batch can stand at different positions.
        ``logits_at`` ([B] indices into T) keeps only those positions: [B, 1, vocab].
        ``cache_rows`` ([B]) names the KV-cache rows the batch's rows use (default: the first B),
        so one request can be prefilled into its own row while others are decoding.
        ``attn_mask`` (bool [B, 1, T, T], no cache) replaces the causal mask: packed training
        sequences use a block-diagonal one so that records do not attend to each other.
        """
        B, T = input_ids.shape
        device = input_ids.device
        if input_pos is None:
            if self.has_cache:
                raise ValueError("with a KV cache, forward needs input_pos")
            input_pos = torch.arange(T, device=device)
        input_pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
        cos, sin = self._rope_table(device)
        cos, sin = cos[input_pos][:, :, None], sin[input_pos][:, :, None]  # [B, T, 1, D]
        mask, length = attn_mask, T
        if self.has_cache:
            # A key slot is visible to a query when it holds an earlier (or the same) position.
            # Compiled decoding attends over the whole cache, masked, so that shapes stay fixed.
            length = self.cache_size if torch.compiler.is_compiling() else int(input_pos.max()) + 1
            # Prompts from position 0 are plain causal, which SDPA runs faster without a mask.
            if not (T > 1 and length == T and bool((input_pos == torch.arange(T, device=device)).all())):
                mask = torch.arange(length, device=device) <= input_pos[:, None, :, None]
        # A no-op unless quantize_int4/_float16 left the embedding 16-bit under a float32 body.
        x = self.embed_tokens(input_ids).to(self.norm.weight.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, length, cache_rows)
        if logits_at is not None:
            x = x[torch.arange(B, device=device), logits_at][:, None]
        return self.lm_head(self.norm(x))
