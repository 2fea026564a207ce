"""The architecture's hyperparameters: one dataclass, named presets, and readers for the
config files each checkpoint format carries (HF config.json, Meta params.json, GGUF metadata)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
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
        for f in fields(self):
            if (value := getattr(self, f.name)) is not None:
                setattr(self, f.name, check_field(f.name, value, f.name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise LlamitaError(
                f"dim {self.dim} must divide by n_heads {self.n_heads}, and n_heads by n_kv_heads {self.n_kv_heads}"
            )
        if self.hidden_dim is None:
            hidden = meta_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
            self.hidden_dim = check_field("hidden_dim", hidden, "the feed-forward width dim, multiple_of and "
                                          "ffn_dim_multiplier imply")

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


# Each field's type and range: wide enough for any Llama-like model (Llama 3.1 405B: dim 16384, 126 layers, 128
# heads, feed-forward 53248), narrow enough that a corrupt value fails here in one line, not as a traceback deep
# in the model or as a model of 10^9 layers built for hours. The context is only a limit (nothing is sized by it).
_LIMITS: dict[str, tuple[type, float, float]] = {
    "dim": (int, 1, 1 << 16),
    "n_layers": (int, 1, 1024),
    "n_heads": (int, 1, 1024),
    "n_kv_heads": (int, 1, 1024),
    "vocab_size": (int, 1, 1 << 24),
    "multiple_of": (int, 1, 1 << 16),
    "ffn_dim_multiplier": (float, 1e-3, 1e3),
    "hidden_dim": (int, 1, 1 << 20),
    "norm_eps": (float, 0.0, 1.0),
    "rope_theta": (float, 1e-3, 1e12),
    "max_seq_len": (int, 1, 1 << 40),
    "tie_embeddings": (bool, 0, 1),
}


def check_field(field: str, value: Any, name: str) -> Any:
    """``value`` as Config's ``field`` (an int given for a float becomes one), or a one-line error naming it
    as ``name`` (e.g. "config.json: num_attention_heads"): a string, a list, a negative size or NaN."""
    kind, least, most = _LIMITS[field]
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if kind is bool:
        if not isinstance(value, bool):
            raise LlamitaError(f"{name} must be true or false, got {shown}")
        return value
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed) or not least <= value <= most:
        what = f"an integer in [{int(least)}, {int(most)}]" if kind is int else f"a number in [{least:g}, {most:g}]"
        raise LlamitaError(f"{name} must be {what}, got {shown}")
    return kind(value)


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
# Small shapes for training from scratch: llama2.c's TinyStories models (Karpathy, 2023), by parameter count
# (with its 32,000-piece vocabulary; the embedding and the output layer are one matrix, as there). Their
# vocabulary is whatever tokenizer they are trained with (``llamita pretrain`` sets it).
_TINY = {"multiple_of": 32, "tie_embeddings": True}
PRESETS.update({
    "llama2c-260k": Config(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4,
                           max_seq_len=512, tie_embeddings=True),
    "llama2c-15m": Config(dim=288, n_layers=6, n_heads=6, max_seq_len=256, **_TINY),
    "llama2c-42m": Config(dim=512, n_layers=8, n_heads=8, max_seq_len=1024, **_TINY),
    "llama2c-110m": Config(dim=768, n_layers=12, n_heads=12, max_seq_len=1024, **_TINY),
})


_REQUIRED = object()


def _get(d: dict[str, Any], key: str, field: str, where: str, default: Any = _REQUIRED) -> Any:
    """``d[key]`` checked as Config's ``field``; ``default`` where the file leaves it out (or null)."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise LlamitaError(f"{where}: missing field {key!r}")
        return default
    return check_field(field, value, f"{where}: {key}")


def _object(d: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """``d[key]`` where it is a JSON object; {} where it is absent or null."""
    value = d.get(key)
    if value is not None and not isinstance(value, dict):
        raise LlamitaError(f"{where}: {key} must be an object, got {type(value).__name__}")
    return value or {}


def _build(where: str, **values: Any) -> Config:
    """A Config of values read from ``where``; its consistency errors (dim by heads) name the file."""
    try:
        return Config(**values)
    except LlamitaError as e:
        raise LlamitaError(f"{where}: {e}") from None


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> Config:
    """Config from a transformers ``LlamaConfig`` dict (config.json)."""
    arch = d.get("model_type")
    if arch not in ("llama", None):
        raise LlamitaError(f"{where}: unsupported architecture model_type={arch!r} (llamita runs 'llama')")
    parameters = _object(d, "rope_parameters", where)
    scaling = _object(d, "rope_scaling", where) or parameters
    if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise LlamitaError(f"{where}: unsupported rope_scaling {scaling!r}")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise LlamitaError(f"{where}: attention_bias/mlp_bias are not part of the Llama 2 architecture")
    if d.get("hidden_act", "silu") != "silu":
        raise LlamitaError(f"{where}: unsupported hidden_act {d['hidden_act']!r} (Llama uses silu)")
    n_heads = _get(d, "num_attention_heads", "n_heads", where)
    dim = _get(d, "hidden_size", "dim", where)
    if d.get("head_dim") not in (None, dim // n_heads):
        raise LlamitaError(f"{where}: head_dim {d['head_dim']!r} != hidden_size / num_attention_heads")
    rope_theta = _get(parameters, "rope_theta", "rope_theta", f"{where}: rope_parameters", 10000.0)
    return _build(
        where,
        dim=dim,
        n_layers=_get(d, "num_hidden_layers", "n_layers", where),
        n_heads=n_heads,
        n_kv_heads=_get(d, "num_key_value_heads", "n_kv_heads", where, n_heads),
        vocab_size=_get(d, "vocab_size", "vocab_size", where),
        hidden_dim=_get(d, "intermediate_size", "hidden_dim", where),
        norm_eps=_get(d, "rms_norm_eps", "norm_eps", where, 1e-6),
        rope_theta=_get(d, "rope_theta", "rope_theta", where, rope_theta),
        max_seq_len=_get(d, "max_position_embeddings", "max_seq_len", where, 2048),
        tie_embeddings=_get(d, "tie_word_embeddings", "tie_embeddings", where, False),
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


def config_from_meta(d: dict[str, Any], stored_vocab: int, where: str = "params.json") -> Config:
    """Config from Meta's params.json; the vocabulary is the weights' (``stored_vocab``) where it says -1."""
    known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size", "use_scaled_rope"}
    if extra := set(d) - known:
        raise LlamitaError(f"{where}: unknown fields {sorted(extra)}")
    if d.get("use_scaled_rope"):
        raise LlamitaError(f"{where}: use_scaled_rope (Llama 3.1) is not supported")
    return _build(
        where,
        dim=_get(d, "dim", "dim", where),
        n_layers=_get(d, "n_layers", "n_layers", where),
        n_heads=_get(d, "n_heads", "n_heads", where),
        n_kv_heads=_get(d, "n_kv_heads", "n_kv_heads", where, None),
        vocab_size=stored_vocab if d.get("vocab_size", -1) == -1 else _get(d, "vocab_size", "vocab_size", where),
        multiple_of=_get(d, "multiple_of", "multiple_of", where, 256),
        ffn_dim_multiplier=_get(d, "ffn_dim_multiplier", "ffn_dim_multiplier", where, None),
        norm_eps=_get(d, "norm_eps", "norm_eps", where, 1e-5),
        rope_theta=_get(d, "rope_theta", "rope_theta", where, 10000.0),
        max_seq_len=_get(d, "max_seq_len", "max_seq_len", where, 4096),
    )


def config_from_gguf(meta: dict[str, Any], vocab_size: int, tied: bool, where: str) -> Config:
    """Config from GGUF metadata (``llama.*`` keys)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LlamitaError(f"{where}: unsupported architecture {arch!r} (llamita runs 'llama')")

    def key(k: str, field: str, default: Any = _REQUIRED) -> Any:
        return _get(meta, f"llama.{k}", field, where, default)

    n_heads = key("attention.head_count", "n_heads")
    dim = key("embedding_length", "dim")
    if meta.get("llama.rope.dimension_count", dim // n_heads) != dim // n_heads:
        raise LlamitaError(f"{where}: partial rotary (llama.rope.dimension_count) is not supported")
    if meta.get("llama.rope.scaling.type", "none") not in ("none",):
        raise LlamitaError(f"{where}: unsupported rope scaling {meta['llama.rope.scaling.type']!r}")
    return _build(
        where,
        dim=dim,
        n_layers=key("block_count", "n_layers"),
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", "n_kv_heads", n_heads),
        vocab_size=key("vocab_size", "vocab_size", vocab_size),
        hidden_dim=key("feed_forward_length", "hidden_dim"),
        norm_eps=key("attention.layer_norm_rms_epsilon", "norm_eps"),
        rope_theta=key("rope.freq_base", "rope_theta", 10000.0),
        max_seq_len=key("context_length", "max_seq_len"),
        tie_embeddings=tied,
    )
