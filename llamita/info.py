"""What ``llamita info`` reports: the architecture, size and storage of a checkpoint or preset."""

from __future__ import annotations

from pathlib import Path

import torch

from llamita.config import PRESETS, Config
from llamita.formats import read_checkpoint
from llamita.formats.gguf import stored_kind
from llamita.model import Llama


def parameter_count(config: Config) -> int:
    """Parameters of the architecture, shared (tied) tensors counted once; built on the meta device."""
    with torch.device("meta"):
        model = Llama(config)
    return sum(p.numel() for p in model.parameters())


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError


def describe(source: str | Path | None) -> str:
    """A human-readable report; ``source`` is a checkpoint, a .gguf file or a preset name."""
    if source is not None and str(source) in PRESETS:
        config, stored = Config.from_name(str(source)), None
        header = [f"source:         preset {source} (no weights)"]
    else:
        ckpt = read_checkpoint(source)
        config, stored = ckpt.config, ckpt
        types = ", ".join(f"{k} x{v}" for k, v in sorted(ckpt.tensor_types.items(), key=lambda kv: -kv[1]))
        header = [
            f"source:         {ckpt.path}",
            f"format:         {ckpt.format}",
            f"stored types:   {types}",
            f"stored size:    {_size(ckpt.nbytes)}",
        ]
    n = parameter_count(config)
    lines = header + [
        f"layers:         {config.n_layers}",
        f"heads:          {config.n_heads} query, {config.n_kv_heads} key-value (head dim {config.head_dim})",
        f"dims:           model {config.dim}, feed-forward {config.hidden_dim}",
        f"vocab:          {config.vocab_size}",
        f"context:        {config.max_seq_len}",
        f"rope theta:     {config.rope_theta:g}",
        f"norm eps:       {config.norm_eps:g}",
        f"tied embedding: {'yes' if config.tie_embeddings else 'no'}",
        f"parameters:     {n:,}",
    ]
    if stored is not None:
        if stored.format == "gguf" and stored_kind(stored) != "none":
            lines.append("loads as:       stored quantization by default (--quantize none: float32)")
        else:
            lines.append(f"loads as:       {str(stored.dtype).removeprefix('torch.')} by default")
    for dtype in (torch.float32, torch.bfloat16):
        lines.append(f"memory {str(dtype).removeprefix('torch.'):9s} {_size(n * dtype.itemsize)}")
    return "\n".join(lines)
