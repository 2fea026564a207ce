"""The model's weight names against the checkpoints'.

Checkpoints (HF, Meta, GGUF) and PEFT adapters hold the q, k, v projections apart, and gate and up
apart; the model holds each group as one matrix, the parts' rows one after the other. This module
is the one place that knows how they correspond: the formats join parts on load and split them on
save, quantization and LoRA find a part's rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from llamita.config import Config
from llamita.errors import LlamitaError

# A fused module (its name inside a block) -> its parts, in row order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
_IN_BLOCK = re.compile(r"(layers\.\d+)\.(.+)")
_PART_OF = {part: (fused, i) for fused, parts in FUSED.items() for i, part in enumerate(parts)}


# A checkpoint weight (its name inside a block, or at the top) -> the dim that tensor parallelism
# splits it along: 0, output features (column parallel); 1, input features (row parallel, an
# all-reduce after); absent, replicated. Meta's consolidated.NN.pth files are cut by the same rule.
SHARD_DIM = {"self_attn.q_proj": 0, "self_attn.k_proj": 0, "self_attn.v_proj": 0, "self_attn.o_proj": 1,
             "mlp.gate_proj": 0, "mlp.up_proj": 0, "mlp.down_proj": 1, "embed_tokens": 1, "lm_head": 0}


def shard_dim(name: str) -> int | None:
    """The dim a checkpoint-named weight ("layers.0.self_attn.o_proj.weight") is split along across
    tensor-parallel ranks; None where every rank holds all of it (the norms)."""
    module = name.removesuffix(".weight")
    m = _IN_BLOCK.fullmatch(module)
    return SHARD_DIM.get(m[2] if m else module)


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s [start, stop) of ``size`` rows or columns: torch.chunk's split (ceil-sized
    pieces, the last shorter), which is how Meta cut its shards."""
    step = -(-size // world)
    return min(rank * step, size), min((rank + 1) * step, size)


def take_shard(name: str, pieces: list[Tensor], rank: int, world: int) -> Tensor:
    """Rank ``rank``'s slice of the weight ``name`` that a checkpoint stores as ``pieces`` joined
    along its shard dim (Meta's shards; one piece: the whole tensor). Only the pieces' parts inside
    the slice are read: when the pieces are the ranks' own shards, exactly one of them."""
    dim = shard_dim(name)
    if dim is None or world == 1:
        return pieces[0] if dim is None else torch.cat(pieces, dim)
    start, stop = shard_range(sum(p.shape[dim] for p in pieces), rank, world)
    out, offset = [], 0
    for p in pieces:
        lo, hi = max(start, offset), min(stop, offset + p.shape[dim])
        if lo < hi:
            out.append(p.narrow(dim, lo - offset, hi - lo))
        offset += p.shape[dim]
    return (out[0] if len(out) == 1 else torch.cat(out, dim)).contiguous()


def part_rows(config: Config, fused: str, world: int = 1) -> list[int]:
    """Rows of each part of a fused module (named inside a block or with its layers.N. prefix);
    ``world``: on one of that many tensor-parallel ranks."""
    if "qkv_proj" in fused:
        rows = [config.n_heads * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2
    else:
        rows = [config.hidden_dim] * 2
    return [r // world for r in rows]


def parts(config: Config, module: str, world: int = 1) -> list[tuple[str, int, int | None]]:
    """(checkpoint module name, first row, end row) of each part of the model's ``module``
    ("layers.3.self_attn.qkv_proj"); a module that is not fused is its own single part, all its
    rows (end None), so that ``weight[start:end]`` is a part's rows either way. ``world``: of a
    tensor-parallel rank's module (each part's rows divided among ``world`` ranks)."""
    m = _IN_BLOCK.fullmatch(module)
    if m is None or m[2] not in FUSED:
        return [(module, 0, None)]
    out, start = [], 0
    for part, rows in zip(FUSED[m[2]], part_rows(config, m[2], world)):
        out.append((f"{m[1]}.{part}", start, start + rows))
        start += rows
    return out


def fused_name(name: str) -> tuple[str, int] | None:
    """A checkpoint module or weight name -> (the model's, the part's index), None if not a part:
    "layers.3.mlp.up_proj.weight" -> ("layers.3.mlp.gate_up_proj.weight", 1)."""
    suffix = ".weight" if name.endswith(".weight") else ""
    m = _IN_BLOCK.fullmatch(name.removesuffix(".weight"))
    if m is None or m[2] not in _PART_OF:
        return None
    fused, index = _PART_OF[m[2]]
    return f"{m[1]}.{fused}{suffix}", index


def join(tensors: Iterator[tuple[str, Tensor, Path]], config: Config, source: Path,
         cat: Callable[[list], Tensor] = torch.cat) -> Iterator[tuple[str, Tensor, Path]]:
    """Checkpoint-named (name, tensor, file) -> model-named: each group of parts concatenated (by
    ``cat``: quantized parts have their own) once its last part has come; other tensors pass
    through as they come."""
    waiting: dict[str, dict[int, Tensor]] = {}
    for name, tensor, file in tensors:
        fused = fused_name(name)
        if fused is None:
            yield name, tensor, file
            continue
        group = waiting.setdefault(fused[0], {})
        group[fused[1]] = tensor
        if len(group) == len(part_rows(config, fused[0])):
            del waiting[fused[0]]
            yield fused[0], cat([group[i] for i in range(len(group))]), file
    missing = [part for name, group in waiting.items()
               for i, (part, _, _) in enumerate(parts(config, name.removesuffix(".weight"))) if i not in group]
    if missing:
        raise LlamitaError(f"{source}: missing tensors {', '.join(m + '.weight' for m in missing[:4])}"
                           f"{' ...' if len(missing) > 4 else ''}")


def split(state: dict[str, Tensor], config: Config, world: int = 1) -> dict[str, Tensor]:
    """Model-named weights -> checkpoint-named (fused matrices cut into their parts); ``world``: a
    tensor-parallel rank's weights."""
    out = {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        for part, start, stop in parts(config, module, world):
            out[f"{part}.weight" if part != module else name] = tensor[start:stop]
    return out
