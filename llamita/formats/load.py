"""Which format a source is, and the model built from its checkpoint (or written back as HF's).

``detect`` is the one place that decides which format a source is, so that models and
tokenizers are found the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llamita import assets, layout
from llamita.errors import LlamitaError
from llamita.formats import gguf, hf, meta
from llamita.formats.checkpoint import Checkpoint, interleaved_to_half, rotary_heads
from llamita.model import Llama


def detect(source: str | Path | None) -> tuple[str, Path]:
    """Return ``(format, path)`` with format one of "hf", "meta", "gguf".

    ``source`` is a directory, a ``.gguf`` file, or the default model's name (or None for it).
    """
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


def read_checkpoint(source: str | Path | None) -> Checkpoint:
    fmt, path = detect(source)
    return {"hf": hf, "meta": meta, "gguf": gguf}[fmt].read(path)


def load_model(source: str | Path | None = None, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> Llama:
    """Build a Llama from a checkpoint directory, a .gguf file or the default model's name.

    The model is built on the meta device and each tensor moved in one at a time, so loading
    needs little more memory than the weights themselves. Returned in eval mode.
    """
    return model_from_checkpoint(read_checkpoint(source), dtype=dtype, device=device)


def model_from_checkpoint(ckpt: Checkpoint, *, dtype: torch.dtype | None = None,
                          device: str | torch.device = "cpu") -> Llama:
    config, dtype = ckpt.config, dtype or ckpt.dtype
    with torch.device("meta"):
        model = Llama(config)
    expected = {name: t.shape for name, t in layout.split(dict(model.state_dict()), config).items()}
    seen: set[str] = set()

    def checked():
        for name, tensor, file in ckpt.tensors():
            if name not in expected:
                raise LlamitaError(f"{file}: unexpected tensor {name!r}")
            heads = rotary_heads(name, config) if ckpt.rotary == "interleaved" else None
            if heads and tensor.shape == expected[name]:
                tensor = interleaved_to_half(tensor, heads)
            if tensor.shape != expected[name]:
                raise LlamitaError(
                    f"{file}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"the config implies {tuple(expected[name])}")
            seen.add(name)
            yield name, tensor, file

    for name, tensor, _ in layout.join(checked(), config, ckpt.path):
        module_name, _, attr = name.rpartition(".")
        param = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
        setattr(model.get_submodule(module_name), attr, param)
    model.tie_weights()
    if config.tie_embeddings:
        seen.add("lm_head.weight")
    if missing := sorted(set(expected) - seen):
        raise LlamitaError(f"{ckpt.path}: missing tensors {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return model.eval()


def save_model(model: Llama, directory: str | Path, *, max_shard_bytes: int = 5 * 1024**3,
               state_dict: dict[str, torch.Tensor] | None = None, template: str | None = None) -> None:
    """Write the Hugging Face layout: config.json + safetensors, sharded with an index above 5 GB.
    ``state_dict``: the weights to write instead of the model's own (e.g. gathered from FSDP shards);
    ``template``: the prompt template it was fine-tuned with, recorded in config.json."""
    weights = state_dict if state_dict is not None else dict(model.state_dict())
    hf.write(model.config, layout.split(weights, model.config), Path(directory), max_shard_bytes, template)
