"""GGUF files (llama.cpp): metadata to Config, tensors dequantized with the gguf package, and
Q4_1 blocks read as they are stored (codes, scales, zeros) for lossless int4 layers."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch
from torch import Tensor

from llamita.config import Config, config_from_gguf
from llamita.errors import LlamitaError
from llamita.formats.checkpoint import Checkpoint, interleaved_to_half, rotary_heads


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Memory-map a GGUF file, turning the reader's failures into one clear error.

    Parsing a large vocabulary takes seconds, so the model and the tokenizer share one reader.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise LlamitaError(f"{path}: no such file")
    stat = path.stat()
    return _reader(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _reader(path: Path, mtime_ns: int, size: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on bad files
        raise LlamitaError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key/value field of the file as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


# GGUF's tensor names -> llamita's (the per-block part after "blk.N.")
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def from_gguf_name(name: str, where: Path) -> str | None:
    """A GGUF tensor name -> llamita's checkpoint name; None for tensors llamita does not use."""
    if name == "rope_freqs.weight":
        return None
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"layers.{parts[1]}.{_LAYER[parts[2]]}.{suffix}"
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    raise LlamitaError(f"{where}: unexpected tensor {name!r} for a llama model")


def to_torch(t: gguf.ReaderTensor, where: Path) -> Tensor:
    """One tensor in torch's [out, in] order, dequantized to float32 where it is quantized."""
    qtype = t.tensor_type
    shape = [int(s) for s in reversed(t.shape)]
    if qtype.name in _PLAIN:
        data = np.asarray(t.data)
        if qtype.name == "BF16":
            return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(data.copy()).reshape(shape)
    try:
        data = gguf.quants.dequantize(t.data, qtype)
    except NotImplementedError:
        raise LlamitaError(f"{where}: tensor {t.name} has quantization type {qtype.name}, "
                           "which llamita cannot dequantize") from None
    return torch.from_numpy(np.ascontiguousarray(data)).reshape(shape)


def read(path: Path) -> Checkpoint:
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise LlamitaError(f"{path}: no token_embd.weight tensor")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config = config_from_gguf(meta, vocab_size=int(emb.shape[1]), tied="output.weight" not in names, where=str(path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    dtype = _PLAIN.get(emb.tensor_type.name, torch.float32)

    def tensors() -> Iterator[tuple[str, Tensor, Path]]:
        for t in reader.tensors:
            if (name := from_gguf_name(t.name, path)) is not None:
                yield name, to_torch(t, path), path

    return Checkpoint(
        format="gguf", path=path, config=config, dtype=dtype, tensor_types=dict(types),
        nbytes=sum(int(t.n_bytes) for t in reader.tensors), tensors=tensors, rotary="interleaved",
    )


def q4_1_tensors(path: str | Path, config: Config) -> Iterator[tuple[str, Tensor, Tensor, Tensor]]:
    """(checkpoint module name, codes, scales, zeros) for each Q4_1 tensor of a GGUF file, one by
    one: codes 0..15 [N, K], and per group of 32 the scale and the value of code 8, so that a weight
    is ``(code - 8) * scale + zero``. q/k rows are permuted to the rotate-half layout, as the
    float weights are on load."""
    path = Path(path)
    for t in open_gguf(path).tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1 or (name := from_gguf_name(t.name, path)) is None:
            continue
        N, K = int(t.shape[1]), int(t.shape[0])
        # A block: d and m (float16), then 16 bytes: weights 0..15 in the low nibbles, 16..31 in the high.
        blocks = torch.from_numpy(np.array(t.data)).reshape(N, K // 32, 20)
        d, m = blocks[..., :4].contiguous().view(torch.float16).float().unbind(-1)
        qs = blocks[..., 4:].to(torch.int32)
        codes, scales, zeros = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(N, K), d, m + 8 * d
        if heads := rotary_heads(name, config):
            codes, scales, zeros = (interleaved_to_half(x, heads) for x in (codes, scales, zeros))
        yield name.removesuffix(".weight"), codes, scales, zeros
