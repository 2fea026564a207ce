"""Which format a source is, and the model built from its checkpoint (or written back as HF's).

``detect`` is the one place that decides which format a source is, so that models and
tokenizers are found the same way.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Iterator, Protocol

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
               device: str | torch.device = "cpu", quantize: str = "none", shard: Shard | None = None) -> Llama:
    """Build a Llama from a checkpoint directory, a .gguf file or the default model's name.

    The model is built on the meta device and each tensor moved in one at a time, so loading
    needs little more memory than the weights themselves. ``quantize``: "none" (float weights in
    ``dtype``), "auto" (quantized GGUF tensors stay as stored), "int4", "int8" or "float16" (each
    layer quantized as it arrives: the float model is never held). ``shard``: build one tensor-parallel
    rank's part only, reading only its slices (``llamita.parallel``). Returned in eval mode.
    """
    return model_from_checkpoint(read_checkpoint(source), dtype=dtype, device=device, quantize=quantize, shard=shard)


@functools.cache
def _large_frees_go_back() -> None:
    """Make glibc return large freed blocks to the system at once. By default its threshold for that
    rises with each large block freed, after which the loader's per-tensor temporaries (tens to
    hundreds of MB at 7B) are carved from the heap and stay there as fragments: measured here, a
    loaded model's memory grew by twice its own size."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: fixed, no longer adaptive
    except (OSError, AttributeError):  # not glibc
        pass


def _place(model: Llama, name: str, tensor, quantize: str, dtype: torch.dtype, device) -> bool:
    """Put one (joined) weight into the model: a quantized layer where ``quantize`` asks for one or the
    file stores one, else a parameter. True where the model now holds quantized weights."""
    from llamita.quantize import QuantEmbedding, QuantizedWeight, QuantLinear, quantized_layer

    module_name, _, attr = name.rpartition(".")
    to_device = lambda t: t.map_rows(lambda x: x.to(device)) if isinstance(t, QuantizedWeight) else t.to(device)  # noqa: E731
    tensor = [to_device(t) for t in tensor] if isinstance(tensor, list) else to_device(tensor)
    stored = isinstance(tensor, (QuantizedWeight, list))
    block_linear = module_name.startswith("layers.") and isinstance(model.get_submodule(module_name), nn.Linear)
    if block_linear or module_name == "lm_head" and stored:
        # the output layer keeps its stored codes (llama.cpp's Q6_K or Q8_0) unless float16 is asked for
        layer = quantized_layer(tensor, quantize if module_name != "lm_head" or quantize == "float16" else "auto")
        if layer is not None:
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            return True
    if stored and quantize != "float16":  # the embedding, looked up in its stored codes
        table = QuantLinear(tensor)
        model.embed_tokens = QuantEmbedding(table)
        if model.config.tie_embeddings:
            model.lm_head = table
        return True
    if stored:  # float16: a float16 table, and fbgemm's float16 layer for a tied output
        if model.config.tie_embeddings:
            model.lm_head = quantized_layer(tensor, "float16")
        tensor = tensor.dequantize()
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor.to(dtype=dtype), requires_grad=False))
    return False


class Shard(Protocol):
    """One tensor-parallel rank, as loading sees it (``llamita.parallel.TensorParallel``)."""

    world: int

    def split_model(self, model: Llama) -> None: ...

    def tensors(self, ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor, Path]]: ...


def model_from_checkpoint(ckpt: Checkpoint, *, dtype: torch.dtype | None = None,
                          device: str | torch.device = "cpu", quantize: str = "none",
                          shard: Shard | None = None) -> Llama:
    from llamita.quantize import QuantizedWeight, cat_rows, check_kind, finish

    check_kind(quantize, device)
    _large_frees_go_back()
    config, dtype = ckpt.config, dtype or ckpt.dtype
    world = shard.world if shard else 1
    with torch.device("meta"):
        model = Llama(config)
        if shard:
            shard.split_model(model)
    expected = {name: t.shape for name, t in layout.split(dict(model.state_dict()), config, world).items()}
    seen: set[str] = set()
    quantized = quantize not in ("auto", "none")

    def checked():
        for name, tensor, file in (shard.tensors(ckpt) if shard else ckpt.tensors()):
            if name not in expected:
                raise LlamitaError(f"{file}: unexpected tensor {name!r}")
            heads = rotary_heads(name, config) if ckpt.rotary == "interleaved" else None
            heads = heads // world if heads else None  # a rank's q/k rows hold whole heads
            if heads and tensor.shape == expected[name]:
                permute = functools.partial(interleaved_to_half, n_heads=heads)
                tensor = tensor.map_rows(permute) if isinstance(tensor, QuantizedWeight) else permute(tensor)
            if tensor.shape != expected[name]:
                raise LlamitaError(
                    f"{file}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"the config implies {tuple(expected[name])}")
            if isinstance(tensor, QuantizedWeight) and quantize == "none":
                tensor = tensor.dequantize()
            seen.add(name)
            yield name, tensor, file

    for name, tensor, _ in layout.join(checked(), config, ckpt.path, cat=cat_rows):
        quantized |= _place(model, name, tensor, quantize, dtype, device)
    if isinstance(model.lm_head, nn.Linear):
        model.tie_weights()
    if model.config.tie_embeddings:
        seen.add("lm_head.weight")
    if missing := sorted(set(expected) - seen):
        raise LlamitaError(f"{ckpt.path}: missing tensors {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if quantized:
        finish(model, quantize)
    return model.eval()


def save_model(model: Llama, directory: str | Path, *, max_shard_bytes: int = 5 * 1024**3,
               state_dict: dict[str, torch.Tensor] | None = None, template: str | None = None) -> None:
    """Write the Hugging Face layout: config.json + safetensors, sharded with an index above 5 GB.
    ``state_dict``: the weights to write instead of the model's own (e.g. gathered from FSDP shards);
    ``template``: the prompt template it was fine-tuned with, recorded in config.json."""
    weights = state_dict if state_dict is not None else dict(model.state_dict())
    hf.write(model.config, layout.split(weights, model.config), Path(directory), max_shard_bytes, template)
