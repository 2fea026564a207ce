"""Meta's original checkpoints: params.json plus consolidated.NN.pth model-parallel shards."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from llamita.config import config_from_meta
from llamita.errors import LlamitaError
from llamita.files import load_state_dict, read_json
from llamita.formats.checkpoint import Checkpoint

# Meta's name -> (llamita's name, dim the shards are joined on; None = replicated, take shard 0)
_LAYER = {
    "attention.wq": ("self_attn.q_proj", 0),
    "attention.wk": ("self_attn.k_proj", 0),
    "attention.wv": ("self_attn.v_proj", 0),
    "attention.wo": ("self_attn.o_proj", 1),
    "feed_forward.w1": ("mlp.gate_proj", 0),
    "feed_forward.w3": ("mlp.up_proj", 0),
    "feed_forward.w2": ("mlp.down_proj", 1),
    "attention_norm": ("input_layernorm", None),
    "ffn_norm": ("post_attention_layernorm", None),
}
_TOP = {"tok_embeddings": ("embed_tokens", 1), "norm": ("norm", None), "output": ("lm_head", 0)}


def _map(name: str) -> tuple[str, int | None] | None:
    """Meta's tensor name -> (llamita's, join dim); None for tensors to ignore (rope.freqs)."""
    if name == "rope.freqs":
        return None
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name):
        if m[2] in _LAYER:
            new, dim = _LAYER[m[2]]
            return f"layers.{m[1]}.{new}.weight", dim
    if m := re.fullmatch(r"(\w+)\.weight", name):
        if m[1] in _TOP:
            new, dim = _TOP[m[1]]
            return f"{new}.weight", dim
    raise LlamitaError(f"unexpected tensor {name!r} in a Meta checkpoint")


def shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise LlamitaError(f"{path}: params.json but no consolidated.NN.pth files")
    numbers = [int(f.name.split(".")[1]) for f in files]
    if numbers != list(range(len(files))):
        raise LlamitaError(f"{path}: shards are not numbered 00..{len(files) - 1:02d}: {[f.name for f in files]}")
    return files


def _merged(shards: list[dict[str, Tensor]], files: list[Path]) -> Iterator[tuple[str, Tensor, Path]]:
    for name in shards[0]:
        mapped = _map(name)
        if mapped is None:
            continue
        new, dim = mapped
        if dim is None or len(shards) == 1:
            yield new, shards[0][name], files[0]
            continue
        try:
            parts = [s[name] for s in shards]
        except KeyError:
            raise LlamitaError(f"{files[0].parent}: tensor {name} is missing from some shards") from None
        yield new, torch.cat(parts, dim=dim), files[0]


def read(path: Path) -> Checkpoint:
    files = shard_files(path)
    shards = [load_state_dict(f, "PyTorch checkpoint") for f in files]  # memory-mapped: nothing is read yet
    emb = shards[0].get("tok_embeddings.weight")
    if emb is None or emb.dim() != 2:
        raise LlamitaError(f"{files[0]}: no tok_embeddings.weight matrix")
    params = read_json(path / "params.json")
    config = config_from_meta(params, stored_vocab=emb.shape[0], where=str(path / "params.json"))
    types = Counter(str(t.dtype).removeprefix("torch.") for s in shards for t in s.values())
    nbytes = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    return Checkpoint(
        format="meta", path=path, config=config, dtype=emb.dtype, tensor_types=dict(types), nbytes=nbytes,
        tensors=lambda: _merged(shards, files), rotary="interleaved",
    )
