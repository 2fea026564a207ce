"""Checkpoint formats: each module turns files into (Config, tensors) and back.

``detect`` is the one place that decides which format a source is, so that models and
tokenizers are found the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from llamita.config import Config
from llamita.errors import LlamitaError
from llamita.model import Llama


def detect(source: str | Path | None) -> tuple[str, Path]:
    """Return ``(format, path)`` with format one of "hf", "meta", "gguf".

    ``source`` is a directory, a ``.gguf`` file, or the default model's name (or None for it).
    """
    from llamita import assets

    if source is None or str(source) == assets.DEFAULT_MODEL_NAME:
        return "gguf", assets.default_model_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise LlamitaError(f"{path}: no such file or directory (nor a known model name: {assets.DEFAULT_MODEL_NAME})")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", path
        raise LlamitaError(f"{path}: not a GGUF file (no GGUF magic); give a .gguf file or a checkpoint directory")
    if (path / "config.json").is_file():
        return "hf", path
    if (path / "params.json").is_file():
        return "meta", path
    raise LlamitaError(
        f"{path}: not a checkpoint directory: expected config.json (Hugging Face) or params.json (Meta)"
    )


@dataclass
class Checkpoint:
    """What a format module reads: the architecture, and the weights on demand."""

    format: str  # "hf", "meta", "gguf"
    path: Path
    config: Config
    dtype: torch.dtype  # the dtype a model loads in when none is asked for
    tensor_types: dict[str, int]  # stored dtype / quantization type -> number of tensors
    nbytes: int  # bytes the stored weights take
    tensors: Callable[[], Iterator[tuple[str, Tensor, Path]]]  # (llamita name, tensor, file), one by one
    rotary: str = "half"  # "interleaved": q/k rows in Meta's order, permuted on load
    metadata: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(source: str | Path | None) -> Checkpoint:
    fmt, path = detect(source)
    module = {"hf": hf, "meta": meta, "gguf": gguf}[fmt]
    return module.read(path)


def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k projection rows from Meta's interleaved rotary pairs to the rotate-half layout.

    Meta rotates (x0, x1), (x2, x3)...; the rotate-half form rotates (x_i, x_{i+d/2}). Within each
    head, rows 0, 2, 4... move to the first half and rows 1, 3, 5... to the second.
    """
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_model(source: str | Path | None = None, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> Llama:
    """Build a Llama from a checkpoint directory, a .gguf file or the default model's name.

    The model is built on the meta device and each tensor moved in one at a time, so loading
    needs little more memory than the weights themselves. Returned in eval mode.
    """
    ckpt = read_checkpoint(source)
    return build_model(ckpt, dtype=dtype, device=device)


def build_model(ckpt: Checkpoint, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Llama:
    config, dtype = ckpt.config, dtype or ckpt.dtype
    with torch.device("meta"):
        model = Llama(config)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    seen: set[str] = set()
    for name, tensor, file in ckpt.tensors():
        if name not in expected:
            raise LlamitaError(f"{file}: unexpected tensor {name!r}")
        if ckpt.rotary == "interleaved" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.n_heads if "q_proj" in name else config.n_kv_heads
            if tensor.shape == expected[name]:
                tensor = interleaved_to_half(tensor, heads)
        if tensor.shape != expected[name]:
            raise LlamitaError(
                f"{file}: tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name])}"
            )
        module_name, _, attr = name.rpartition(".")
        param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        setattr(model.get_submodule(module_name), attr, param)
        seen.add(name)
    model.tie_weights()
    if config.tie_embeddings:
        seen.add("lm_head.weight")
    if missing := sorted(set(expected) - seen):
        raise LlamitaError(f"{ckpt.path}: missing tensors {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return model.eval()


def save_model(model: Llama, directory: str | Path, *, max_shard_bytes: int = 5 * 1024**3,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the Hugging Face layout: config.json + safetensors, sharded with an index above 5 GB.
    ``state_dict``: the weights to write instead of the model's own (e.g. gathered from FSDP shards)."""
    weights = state_dict if state_dict is not None else dict(model.state_dict())
    hf.write(model.config, weights, Path(directory), max_shard_bytes)


from llamita.formats import gguf, hf, meta  # noqa: E402  (the modules import Checkpoint from here)
