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


def part_rows(config: Config, fused: str) -> list[int]:
    """Rows of each part of a fused module (named inside a block or with its layers.N. prefix)."""
    if "qkv_proj" in fused:
        return [config.n_heads * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2
    return [config.hidden_dim] * 2


def parts(config: Config, module: str) -> list[tuple[str, int, int | None]]:
    """(checkpoint module name, first row, end row) of each part of the model's ``module``
    ("layers.3.self_attn.qkv_proj"); a module that is not fused is its own single part, all its
    rows (end None), so that ``weight[start:end]`` is a part's rows either way."""
    m = _IN_BLOCK.fullmatch(module)
    if m is None or m[2] not in FUSED:
        return [(module, 0, None)]
    out, start = [], 0
    for part, rows in zip(FUSED[m[2]], part_rows(config, m[2])):
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


def split(state: dict[str, Tensor], config: Config) -> dict[str, Tensor]:
    """Model-named weights -> checkpoint-named (fused matrices cut into their parts)."""
    out = {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        for part, start, stop in parts(config, module):
            out[f"{part}.weight" if part != module else name] = tensor[start:stop]
    return out
