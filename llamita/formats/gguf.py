"""GGUF files (llama.cpp): metadata to Config; tensors read one at a time from the memory-mapped file,
float types as tensors, quantized blocks as ``QuantizedWeight`` codes that quantized layers run on
as stored, with no float copy of the model at any point."""

from __future__ import annotations

import functools
import mmap
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
import torch
from torch import Tensor

from llamita.config import config_from_gguf
from llamita.errors import LlamitaError
from llamita.formats import blocks
from llamita.formats.checkpoint import Checkpoint
from llamita.quantize import BLOCKS, QuantizedWeight

_MAX_ARRAY = 1 << 24  # items in one metadata array: vocabularies and merge lists run to a few hundred thousand


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
                qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise LlamitaError(f"{self.path}: tensor {name} has unknown type number {int(raw_type[0])}") from None
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            elems = int(np.prod(dims))
            if elems % block:
                raise LlamitaError(f"{self.path}: tensor {name} has shape {tuple(int(d) for d in dims)}, "
                                   f"not whole blocks of {block} ({qtype.name})")
            spans.append((start_offs + int(offset[0]), elems // block * size, name, qtype, dims))
        spans.sort()
        ends = [min(start, len(self.data)) for start, *_ in spans[1:]] + [len(self.data)]
        for (start, nbytes, name, qtype, dims), end in zip(spans, ends):
            if start + nbytes > end:
                what = f"{self.path}: tensor {name} ({qtype.name}, shape {tuple(int(d) for d in dims)}) needs {nbytes}"
                if start >= len(self.data):
                    raise LlamitaError(f"{what} bytes at offset {start}, past the end of the file ({len(self.data)} "
                                       "bytes): truncated or corrupt file")
                where = "the file ends" if end == len(self.data) else "the next tensor starts"
                raise LlamitaError(f"{what} bytes at offset {start}, but {where} {end - start} bytes after "
                                   "(truncated or corrupt file)")
        super()._build_tensors(start_offs, fields)

    def __init__(self, path: Path):
        self.path = path
        super().__init__(path)

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        """The reader's read, refused past the end of the file: the reader trusts the lengths a file states,
        and reads past the end return empty arrays, not an error."""
        end = offset + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise LlamitaError(f"{self.path}: not a readable GGUF file: {int(count)} values at byte {offset} run past "
                               f"the end of the file ({len(self.data)} bytes)")
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple:
        """The reader's field parser, with an array's length checked first: it reads an array item by item,
        so a few bytes declaring 2^62 items would grow the process until memory ran out."""
        if raw_type == gguf.GGUFValueType.ARRAY:
            items = int(self._get(orig_offs + 4, np.uint64)[0])
            left = len(self.data) - orig_offs - 12  # each item takes a byte at least
            if items > min(left, _MAX_ARRAY):
                limit = "the file holds" if items > left else "any model needs"
                raise LlamitaError(f"{self.path}: not a readable GGUF file: an array at byte {orig_offs} declares "
                                   f"{items} items, more than {limit}")
            item_type = gguf.GGUFValueType(int(self._get(orig_offs, np.uint32)[0]))
            if item_type == gguf.GGUFValueType.STRING:
                return self._strings(orig_offs, items)
            if (scalar := self.gguf_scalar_to_np.get(item_type)) is not None:  # one view for all the values
                values = self._get(orig_offs + 12, scalar, items)
                head = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
                return 12 + int(values.nbytes), [*head, values], [2], [gguf.GGUFValueType.ARRAY, item_type]
        return super()._get_field_parts(orig_offs, raw_type)

    def _strings(self, orig_offs: int, items: int) -> tuple:
        """An array of strings as the reader gives it (a length and a bytes part per string), read in one
        pass over the buffer: the reader's own way takes seconds for a 50k-token vocabulary."""
        data = self.data.view(np.ndarray)  # slicing a memmap costs microseconds in Python; a plain view, not
        buffer = memoryview(data)
        parts: list[np.ndarray] = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
        offs = orig_offs + 12
        for _ in range(items):
            if offs + 8 > len(data):
                raise LlamitaError(f"{self.path}: not a readable GGUF file: a string at byte {offs} runs past the end")
            n = int.from_bytes(buffer[offs: offs + 8], "little")
            if offs + 8 + n > len(data):
                raise LlamitaError(f"{self.path}: not a readable GGUF file: a string of {n} bytes at byte {offs} runs "
                                   "past the end of the file")
            parts += (data[offs: offs + 8].view(np.uint64), data[offs + 8: offs + 8 + n])
            offs += 8 + n
        return offs - orig_offs, parts, list(range(3, len(parts), 2)), [gguf.GGUFValueType.ARRAY,
                                                                          gguf.GGUFValueType.STRING]


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


def quantized_weight(t: gguf.ReaderTensor) -> QuantizedWeight:
    """One quantized tensor [out, in]: Q4_K and Q6_K as their blocks (the CPU kernel reads them as
    stored), the other types decoded to the plain layout."""
    N = int(np.prod(t.shape[1:]))
    raw = torch.from_numpy(np.array(t.data)).view(N, -1)
    if t.tensor_type.name in BLOCKS:
        return QuantizedWeight(raw, None, None, BLOCKS[t.tensor_type.name][1], 256, blocks=t.tensor_type.name)
    return QuantizedWeight(*blocks.decode(raw, t.tensor_type.name))


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
    layer runs them as stored (``blocks.DECODERS``), other quantized types (Q2_K, Q3_K, IQ*) dequantized by
    the gguf package to float32, one tensor at a time."""
    if t.tensor_type.name in blocks.DECODERS:
        return quantized_weight(t)
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
    if len(emb.shape) != 2:
        raise LlamitaError(f"{path}: token_embd.weight has shape {tuple(int(d) for d in emb.shape)}, not a matrix")
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
    return "int8" if types & set(blocks.DECODERS) else "none"
