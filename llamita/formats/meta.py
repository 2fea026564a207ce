"""Meta's original checkpoints: params.json plus consolidated.NN.pth model-parallel shards."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterator

from torch import Tensor

from llamita import layout
from llamita.config import config_from_meta
from llamita.errors import LlamitaError
from llamita.files import load_state_dict, read_json
from llamita.formats.checkpoint import Checkpoint

# Meta's name -> llamita's. The shards are joined along layout.SHARD_DIM's dims: Meta's
# model-parallel split is the tensor-parallel one (replicated tensors: shard 0's).
_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings": "embed_tokens", "norm": "norm", "output": "lm_head"}


def _map(name: str) -> str | None:
    """Meta's tensor name -> llamita's; None for tensors to ignore (rope.freqs)."""
    if name == "rope.freqs":
        return None
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name):
        if m[2] in _LAYER:
            return f"layers.{m[1]}.{_LAYER[m[2]]}.weight"
    if m := re.fullmatch(r"(\w+)\.weight", name):
        if m[1] in _TOP:
            return f"{_TOP[m[1]]}.weight"
    raise LlamitaError(f"unexpected tensor {name!r} in a Meta checkpoint")


def shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise LlamitaError(f"{path}: params.json but no consolidated.NN.pth files")
    numbers = [int(f.name.split(".")[1]) for f in files]
    if numbers != list(range(len(files))):
        raise LlamitaError(f"{path}: shards are not numbered 00..{len(files) - 1:02d}: {[f.name for f in files]}")
    return files


def _merged(shards: list[dict[str, Tensor]], files: list[Path], rank: int = 0,
            world: int = 1) -> Iterator[tuple[str, Tensor, Path]]:
    """The whole tensors, or (``world`` > 1) tensor-parallel rank ``rank``'s slices: with as many
    shards as ranks, each rank's slices are its own file's tensors, and the other files are never read."""
    for name in shards[0]:
        new = _map(name)
        if new is None:
            continue
        if layout.shard_dim(new) is None or len(shards) == world == 1:
            yield new, shards[0][name], files[0]
            continue
        try:
            parts = [s[name] for s in shards]
        except KeyError:
            raise LlamitaError(f"{files[0].parent}: tensor {name} is missing from some shards") from None
        yield new, layout.take_shard(new, parts, rank, world), files[0]


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
        shard=lambda rank, world: _merged(shards, files, rank, world),
    )
