"""What every format module reads a checkpoint into: the architecture, and the weights on demand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from llamita.config import Config


@dataclass
class Checkpoint:
    format: str  # "hf", "meta", "gguf"
    path: Path
    config: Config
    dtype: torch.dtype  # the dtype a model loads in when none is asked for
    tensor_types: dict[str, int]  # stored dtype / quantization type -> number of tensors
    nbytes: int  # bytes the stored weights take
    tensors: Callable[[], Iterator[tuple[str, Tensor, Path]]]  # (checkpoint name, tensor, file), one by one
    rotary: str = "half"  # "interleaved": q/k rows in Meta's order, permuted on load
    # (rank, world) -> the same stream cut to one tensor-parallel rank's slices (layout.shard_dim),
    # read without the rest; None where the format cannot (GGUF)
    shard: Callable[[int, int], Iterator[tuple[str, Tensor, Path]]] | None = None


def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k projection rows from Meta's interleaved rotary pairs to the rotate-half layout.

    Meta rotates (x0, x1), (x2, x3)...; the rotate-half form rotates (x_i, x_{i+d/2}). Within each
    head, rows 0, 2, 4... move to the first half and rows 1, 3, 5... to the second. Works on any
    tensor whose first dimension is the rows (weights, or quantized codes and scales).
    """
    out_dim, *rest = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, *rest).transpose(1, 2).reshape(out_dim, *rest)


def half_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of ``interleaved_to_half``: rotate-half rows back to Meta's interleaved order,
    as GGUF stores q/k (llama.cpp's converters apply the same permutation)."""
    out_dim, *rest = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, *rest).transpose(1, 2).reshape(out_dim, *rest)


def rotary_heads(name: str, config: Config) -> int | None:
    """The heads whose rotary pairs a q/k weight's rows hold; None for any other tensor."""
    if name.endswith("q_proj.weight"):
        return config.n_heads
    if name.endswith("k_proj.weight"):
        return config.n_kv_heads
    return None
