"""Hugging Face checkpoints: config.json plus safetensors (single or sharded) or pytorch_model*.bin."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from llamita import layout
from llamita.config import Config, config_from_hf, config_to_hf
from llamita.errors import LlamitaError
from llamita.files import atomic_write, load_state_dict, read_json
from llamita.formats.checkpoint import Checkpoint

TEMPLATE_KEY = "llamita_template"  # config.json: the prompt template a fine-tuned checkpoint learned


def hf_name(name: str) -> str:
    """llamita's parameter name -> the name in an HF LlamaForCausalLM state dict."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> str:
    """A name in an HF state dict -> llamita's checkpoint name."""
    return name.removeprefix("model.")


def weight_files(path: Path) -> list[Path]:
    """The files holding the weights, safetensors first, following an index when there is one."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise LlamitaError(f"{index}: missing field 'weight_map' (an object of tensor names to file names)")
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            if missing := [f.name for f in files if not f.is_file()]:
                raise LlamitaError(f"{index}: names shard files that are missing: {', '.join(missing)}")
            return files
        if (path / single).is_file():
            return [path / single]
    raise LlamitaError(f"{path}: config.json but no model.safetensors, sharded safetensors or pytorch_model.bin")


def _open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise LlamitaError(f"{file}: not a readable safetensors file ({e})") from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _safetensors(file: Path, rank: int = 0, world: int = 1,
                 tied: bool = False) -> Iterator[tuple[str, Tensor]]:
    """A safetensors file's tensors one at a time, each read into memory of its own. safetensors'
    own reader hands out views of a memory map that stays whole until the file is closed, so a
    checkpoint quantized while loading would hold all of its pages.

    ``world`` > 1: tensor-parallel rank ``rank``'s slices (``layout.shard_dim``), read by ``pread``
    so that the rest never enters memory; a ``tied`` output layer is read as the embedding's rows."""
    _open_safetensors(file)  # the library validates the file
    with open(file, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(start - 8))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            name, shape, dtype = from_hf_name(key), info["shape"], _DTYPES[info["dtype"]]
            reads = [(key, layout.shard_dim(name) if world > 1 else None)]
            if world > 1 and tied and name == "embed_tokens.weight" and "lm_head.weight" not in header:
                reads.append(("lm_head.weight", 0))
            for out, dim in reads:
                begin = start + info["data_offsets"][0]
                yield out, _read_slice(f, file, begin, shape, dtype, dim, rank, world)


def _read_slice(f, file: Path, begin: int, shape: list[int], dtype: torch.dtype, dim: int | None, rank: int,
                world: int) -> Tensor:
    """A stored tensor (at byte ``begin`` of ``f``), or its rank's rows (``dim`` 0) or columns (1):
    rows in one read, columns a few MiB of rows at a time."""
    rows = shape[0] if shape else 1
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    if dim is None:
        return _read(f, file, begin, rows, row_bytes).view(dtype).reshape(shape)
    lo, hi = layout.shard_range(shape[dim], rank, world)
    if dim == 0:
        return _read(f, file, begin + lo * row_bytes, hi - lo, row_bytes).view(dtype).reshape(hi - lo, *shape[1:])
    out = torch.empty(rows, (hi - lo) * dtype.itemsize, dtype=torch.uint8)
    block = max(1, (4 << 20) // max(row_bytes, 1))
    for r in range(0, rows, block):
        n = min(block, rows - r)
        out[r: r + n] = _read(f, file, begin + r * row_bytes, n, row_bytes)[:, lo * dtype.itemsize: hi * dtype.itemsize]
    return out.view(dtype)


def _read(f, file: Path, begin: int, rows: int, row_bytes: int) -> Tensor:
    """``rows`` rows of ``row_bytes`` bytes from byte ``begin``: uint8 [rows, row_bytes]."""
    data = torch.empty(rows, row_bytes, dtype=torch.uint8)
    f.seek(begin)
    if f.readinto(data.numpy()) != data.numel():
        raise LlamitaError(f"{file}: a tensor runs past the end of the file (truncated?)")
    return data


def _tensors(files: list[Path], rank: int = 0, world: int = 1,
             tied: bool = False) -> Iterator[tuple[str, Tensor, Path]]:
    for file in files:
        if file.suffix == ".safetensors":
            for key, t in _safetensors(file, rank, world, tied):
                yield from_hf_name(key), t, file
            continue
        state = load_state_dict(file)  # memory-mapped: a rank's slice reads the pages it covers
        if tied and world > 1 and "model.embed_tokens.weight" in state and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        for key, t in state.items():
            name = from_hf_name(key)
            yield name, layout.take_shard(name, [t], rank, world), file


def _stored_types(files: list[Path]) -> tuple[Counter, int, torch.dtype | None]:
    types: Counter = Counter()
    nbytes, first = 0, None
    for file in files:
        if file.suffix != ".safetensors":
            return types, sum(f.stat().st_size for f in files), None
        f = _open_safetensors(file)
        for key in f.keys():
            sl = f.get_slice(key)
            dtype, shape = sl.get_dtype(), sl.get_shape()
            types[dtype] += 1
            n = 1
            for s in shape:
                n *= s
            nbytes += n * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype, 1)
            first = first or {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(dtype)
    return types, nbytes, first


def read(path: Path) -> Checkpoint:
    cfg_dict = read_json(path / "config.json")
    config = config_from_hf(cfg_dict, where=str(path / "config.json"))
    files = weight_files(path)
    types, nbytes, first = _stored_types(files)
    declared = cfg_dict.get("torch_dtype") or cfg_dict.get("dtype")
    dtype = getattr(torch, declared, None) if isinstance(declared, str) else None
    dtype = dtype if isinstance(dtype, torch.dtype) else None
    return Checkpoint(
        format="hf", path=path, config=config, dtype=dtype or first or torch.float32,
        tensor_types=dict(types), nbytes=nbytes, tensors=lambda: _tensors(files),
        shard=lambda rank, world: _tensors(files, rank, world, config.tie_embeddings),
    )


def trained_template(path: Path) -> str | None:
    """The prompt template recorded in config.json by fine-tuning or merging, if any."""
    template = read_json(path / "config.json").get(TEMPLATE_KEY)
    return template if isinstance(template, str) else None


def write(config: Config, tensors: dict[str, Tensor], directory: Path, shard_bytes: int,
          template: str | None = None) -> None:
    """Write config.json and safetensors that transformers' LlamaForCausalLM loads.

    Each file goes through a temporary name and ``os.replace``; the index (or the single file)
    is written last, so a reader never sees a half-written checkpoint as complete.
    """
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if config.tie_embeddings and name == "lm_head.weight":
            continue  # transformers re-ties it from the embedding
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][hf_name(name)] = t.detach().contiguous().cpu()
        size += nb
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    cfg = {**config_to_hf(config), "torch_dtype": dtype, **({TEMPLATE_KEY: template} if template else {})}
    atomic_write(directory / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    if len(shards) == 1:
        atomic_write(directory / "model.safetensors", lambda p: save_file(shards[0], p, metadata={"format": "pt"}))
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(directory / name, lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(directory / "model.safetensors.index.json", lambda p: p.write_text(json.dumps(index, indent=2) + "\n"))

