"""The architecture's hyperparameters: one dataclass, named presets, and readers for the
config files each checkpoint format carries (HF config.json, Meta params.json, GGUF metadata)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from llamita.errors import LlamitaError


@dataclass
class Config:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query (70B: 8)
    vocab_size: int = 32000
    multiple_of: int = 256  # Meta's rule rounds the SwiGLU width up to a multiple of this
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit SwiGLU width (HF/GGUF state it); None = Meta's rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise LlamitaError(
                f"config: dim {self.dim} must divide by n_heads {self.n_heads}, "
                f"and n_heads by n_kv_heads {self.n_kv_heads}"
            )
        if self.hidden_dim is None:
            self.hidden_dim = meta_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> "Config":
        if name not in PRESETS:
            raise LlamitaError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return replace(PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width exactly as Meta's reference ``FeedForward.__init__`` derives it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


_LLAMA_2 = {
    "7b": Config(dim=4096, n_layers=32, n_heads=32),
    "13b": Config(dim=5120, n_layers=40, n_heads=40),
    "70b": Config(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
}
PRESETS: dict[str, Config] = {}
for _size, _cfg in _LLAMA_2.items():
    PRESETS[f"llama-2-{_size}"] = _cfg
    PRESETS[f"llama-2-{_size}-chat"] = _cfg


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise LlamitaError(f"{where}: missing field {key!r}")
    return d[key]


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> Config:
    """Config from a transformers ``LlamaConfig`` dict (config.json)."""
    arch = d.get("model_type")
    if arch not in ("llama", None):
        raise LlamitaError(f"{where}: unsupported architecture model_type={arch!r} (llamita runs 'llama')")
    scaling = d.get("rope_scaling") or d.get("rope_parameters")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise LlamitaError(f"{where}: unsupported rope_scaling {scaling!r}")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise LlamitaError(f"{where}: attention_bias/mlp_bias are not part of the Llama 2 architecture")
    if d.get("hidden_act", "silu") != "silu":
        raise LlamitaError(f"{where}: unsupported hidden_act {d['hidden_act']!r} (Llama uses silu)")
    n_heads = _need(d, "num_attention_heads", where)
    dim = _need(d, "hidden_size", where)
    if d.get("head_dim") not in (None, dim // n_heads):
        raise LlamitaError(f"{where}: head_dim {d['head_dim']} != hidden_size / num_attention_heads")
    rope_theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return Config(
        dim=dim,
        n_layers=_need(d, "num_hidden_layers", where),
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        vocab_size=_need(d, "vocab_size", where),
        hidden_dim=_need(d, "intermediate_size", where),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_seq_len=d.get("max_position_embeddings", 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def config_to_hf(c: Config) -> dict[str, Any]:
    """The config.json transformers' ``LlamaForCausalLM`` expects for this architecture."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def config_from_meta(d: dict[str, Any], vocab_size: int, where: str = "params.json") -> Config:
    """Config from Meta's params.json; ``vocab_size`` comes from the weights when it says -1."""
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size", "use_scaled_rope"}
    if extra := set(d) - known:
        raise LlamitaError(f"{where}: unknown fields {sorted(extra)}")
    if d.get("use_scaled_rope"):
        raise LlamitaError(f"{where}: use_scaled_rope (Llama 3.1) is not supported")
    return Config(
        dim=_need(d, "dim", where),
        n_layers=_need(d, "n_layers", where),
        n_heads=_need(d, "n_heads", where),
        n_kv_heads=d.get("n_kv_heads"),
        vocab_size=vocab_size,
        multiple_of=d.get("multiple_of", 256),
        ffn_dim_multiplier=d.get("ffn_dim_multiplier"),
        norm_eps=d.get("norm_eps", 1e-5),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        max_seq_len=d.get("max_seq_len", 4096),
    )


def config_from_gguf(meta: dict[str, Any], vocab_size: int, tied: bool, where: str) -> Config:
    """Config from GGUF metadata (``llama.*`` keys)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LlamitaError(f"{where}: unsupported architecture {arch!r} (llamita runs 'llama')")

    def key(k: str) -> Any:
        return _need(meta, f"llama.{k}", where)

    n_heads = key("attention.head_count")
    dim = key("embedding_length")
    if meta.get("llama.rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise LlamitaError(f"{where}: partial rotary (llama.rope.dimension_count) is not supported")
    if meta.get("llama.rope.scaling.type", "none") not in ("none",):
        raise LlamitaError(f"{where}: unsupported rope scaling {meta['llama.rope.scaling.type']!r}")
    return Config(
        dim=dim,
        n_layers=key("block_count"),
        n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
        vocab_size=meta.get("llama.vocab_size", vocab_size),
        hidden_dim=key("feed_forward_length"),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        max_seq_len=key("context_length"),
        tie_embeddings=tied,
    )
