"""GGUF files (llama.cpp): metadata to Config; tensors read one at a time from the memory-mapped file,
float types as tensors, quantized blocks as ``QuantizedWeight`` codes that quantized layers run on
as stored, with no float copy of the model at any point."""

from __future__ import annotations

import functools
import mmap
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
import torch
from torch import Tensor

from llamita.config import config_from_gguf
from llamita.errors import LlamitaError
from llamita.formats.checkpoint import Checkpoint
from llamita.quantize import BLOCK_BYTES, QuantizedWeight

Q = gguf.GGMLQuantizationType


class _Reader(gguf.GGUFReader):
    """The gguf package's reader, checking each tensor's type and byte range before mapping it, so a
    broken file is reported by tensor rather than as a failed reshape."""

    path: Path

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        spans = []
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "replace")
            try:
                qtype = Q(int(raw_type[0]))
            except ValueError:
                raise LlamitaError(f"{self.path}: tensor {name} has unknown type number {int(raw_type[0])}") from None
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            elems = int(np.prod(dims))
            if elems % block:
                raise LlamitaError(f"{self.path}: tensor {name} has shape {tuple(int(d) for d in dims)}, "
                                   f"not whole blocks of {block} ({qtype.name})")
            spans.append((start_offs + int(offset[0]), elems // block * size, name, qtype, dims))
        spans.sort()
        ends = [start for start, *_ in spans[1:]] + [len(self.data)]
        for (start, nbytes, name, qtype, dims), end in zip(spans, ends):
            if start + nbytes > end:
                where = "the file ends" if end == len(self.data) else "the next tensor starts"
                raise LlamitaError(f"{self.path}: tensor {name} ({qtype.name}, shape {tuple(int(d) for d in dims)}) "
                                   f"needs {nbytes} bytes at offset {start}, but {where} {end - start} bytes after "
                                   "(truncated or corrupt file)")
        super()._build_tensors(start_offs, fields)

    def __init__(self, path: Path):
        self.path = path
        super().__init__(path)


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
        return _Reader(path)
    except LlamitaError:
        raise
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
_GGUF_LAYER = {ours: theirs for theirs, ours in _LAYER.items()}
_GGUF_TOP = {ours: theirs for theirs, ours in _TOP.items()}
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


def to_gguf_name(name: str) -> str:
    """llamita's checkpoint name -> GGUF's: the inverse of ``from_gguf_name``."""
    module, _, suffix = name.rpartition(".")
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers":
        return f"blk.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{suffix}"
    return f"{_GGUF_TOP[module]}.{suffix}"


# -- quantized blocks -> codes, scales, offsets ----------------------------------------------------
# Each takes one tensor's blocks as bytes [N rows, blocks per row, block bytes] and returns (codes:
# 8 bits one a weight, 4 bits two a byte in QuantizedWeight's order; scales and offsets [N, K / group]
# in float32; bits; group size), every weight = code * scale + offset exactly as llama.cpp computes it.

def _f16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16).float()[..., 0]


def _nibbles(qs: Tensor) -> Tensor:
    """Bytes [..., n] -> [..., 2n]: the low nibbles, then the high ones."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _high_bits(qh: Tensor, count: int) -> Tensor:
    """Bit j of a little-endian bit field [..., bytes] for j < count."""
    bits = qh[..., :, None] >> torch.arange(8, dtype=torch.uint8)
    return (bits & 1).flatten(-2)[..., :count]


def _k_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block's 12 scale bytes."""
    d, m, md = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    scales = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return scales.float(), mins.float()


def _q4_0(b):
    d = _f16(b[..., 0:2])
    return b[..., 2:18], d, -8 * d, 4, 32  # already QuantizedWeight's packing


def _q4_1(b):
    return b[..., 4:20], _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4, 32


def _q8_0(b):
    return b[..., 2:34].view(torch.int8), _f16(b[..., 0:2]), None, 8, 32


def _q5_0(b):
    q = _nibbles(b[..., 6:22]) | _high_bits(b[..., 2:6], 32) << 4
    return q.to(torch.int8) - 16, _f16(b[..., 0:2]), None, 8, 32


def _q5_1(b):
    q = _nibbles(b[..., 8:24]) | _high_bits(b[..., 4:8], 32) << 4
    return q.to(torch.int8), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 8, 32


def _k_affine(b, q):
    """Super-blocks of 8 groups of 32: w = d * scale * q - dmin * min."""
    scales, mins = _k_scales(b[..., 4:16])
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
    return q, (d * scales).flatten(-2), (-dmin * mins).flatten(-2)


def _q4_k(b):
    # 4 runs of 32 bytes: the low nibbles are one group of 32, the high nibbles the next. Repacked
    # straight into QuantizedWeight's order (byte j of a group: weights j and j + 16).
    qs = b[..., 16:144].unflatten(-1, (4, 2, 16))
    first, second = qs[..., 0, :], qs[..., 1, :]  # bytes 0..15 and 16..31 of each run
    packed = torch.stack([(first & 15) | (second << 4), (first >> 4) | (second & 0xF0)], dim=-2)
    return (*_k_affine(b, packed.flatten(-3)), 4, 32)


def _q5_k(b):
    low = _nibbles(b[..., 48:176].unflatten(-1, (4, 32))).flatten(-2)
    high = (b[..., 16:48][..., None, :] >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1  # group g: bit g
    return (*_k_affine(b, (low | high.flatten(-2) << 4).to(torch.int8)), 8, 32)


def _q6_k(b):
    # two halves of 128 weights: 64 bytes of low nibbles (weights 0..63, then 64..127) and 32 bytes of
    # 2-bit high parts (weights 0..31, 32..63, 64..95, 96..127 at shifts 0, 2, 4, 6); 16 groups of 16.
    ql = _nibbles(b[..., 0:128].unflatten(-1, (2, 64)))
    qh = (b[..., 128:192].unflatten(-1, (2, 1, 32)) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]) & 3
    q = (ql | qh.flatten(-2) << 4).flatten(-2).to(torch.int8) - 32
    return q, _f16(b[..., 208:210])[..., None] * b[..., 192:208].view(torch.int8).float(), None, 8, 16


DECODERS: dict[Q, Callable] = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q8_0: _q8_0, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
                               Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


def decode_blocks(raw: Tensor, qtype: str) -> QuantizedWeight:
    """GGUF blocks [N, row bytes] of type ``qtype`` -> the plain layout, codes exactly as stored,
    scales and offsets in float32 (exact: k-quants multiply two stored numbers)."""
    qtype = Q[qtype]
    N = raw.shape[0]
    codes, scales, offsets, bits, group = DECODERS[qtype](raw.view(N, -1, gguf.GGML_QUANT_SIZES[qtype][1]))
    return QuantizedWeight(codes.reshape(N, -1).contiguous(), scales.reshape(N, -1),
                           None if offsets is None else offsets.reshape(N, -1), bits, group)


def quantized_weight(t: gguf.ReaderTensor, where: Path) -> QuantizedWeight:
    """One quantized tensor [out, in]: Q4_K and Q6_K as their blocks (the CPU kernel reads them as
    stored), the other types decoded to the plain layout."""
    N = int(np.prod(t.shape[1:]))
    raw = torch.from_numpy(np.array(t.data)).view(N, -1)
    if t.tensor_type.name in BLOCK_BYTES:
        bits = {"Q4_K": 4, "Q6_K": 6}[t.tensor_type.name]
        return QuantizedWeight(raw, None, None, bits, 256, blocks=t.tensor_type.name)
    return decode_blocks(raw, t.tensor_type.name)


def _release(reader: gguf.GGUFReader, t: gguf.ReaderTensor) -> None:
    """Drop the file pages a tensor was read from out of this process's memory (they stay in the OS's
    page cache): otherwise the mapped file would count in full on top of the loaded model."""
    mapped = getattr(reader.data, "_mmap", None)
    if mapped is None or not hasattr(mapped, "madvise"):
        return
    start = t.data_offset - t.data_offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, t.data_offset + int(t.n_bytes) - start)


def to_torch(t: gguf.ReaderTensor, where: Path) -> Tensor | QuantizedWeight:
    """One tensor in torch's [out, in] order: float types as tensors, quantized ones as codes where a
    layer runs them as stored (``DECODERS``), other quantized types (Q2_K, Q3_K, IQ*) dequantized by
    the gguf package to float32, one tensor at a time."""
    if t.tensor_type in DECODERS:
        return quantized_weight(t, where)
    shape = [int(s) for s in reversed(t.shape)]
    if t.tensor_type.name not in _PLAIN:
        try:
            return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape)
        except NotImplementedError:
            raise LlamitaError(f"{where}: tensor {t.name} has quantization type {t.tensor_type.name}, which llamita "
                               "cannot load") from None
    data = np.asarray(t.data)
    if t.tensor_type.name == "BF16":
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(data.copy()).reshape(shape)


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

    def tensors() -> Iterator[tuple[str, Tensor | QuantizedWeight, Path]]:
        for t in reader.tensors:
            if (name := from_gguf_name(t.name, path)) is not None:
                value = to_torch(t, path)
                _release(reader, t)
                yield name, value, path

    return Checkpoint(
        format="gguf", path=path, config=config, dtype=dtype, tensor_types=dict(types),
        nbytes=sum(int(t.n_bytes) for t in reader.tensors), tensors=tensors, rotary="interleaved",
    )


def stored_kind(ckpt: Checkpoint) -> str:
    """The ``quantize`` kind closest to how a checkpoint stores its weights: what a model rebuilt
    from float weights (an adapter merged in) is quantized to, so it stays the size it came."""
    types = set(ckpt.tensor_types)
    if types & {"Q4_0", "Q4_1", "Q4_K"}:
        return "int4"
    return "int8" if types & {q.name for q in DECODERS} else "none"
