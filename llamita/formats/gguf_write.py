"""Writing GGUF for llama.cpp and Ollama: a float model's tensors under llama.cpp's names, types and
q/k row order, the ``llama.*`` hyperparameters llama.cpp reads, and the tokenizer. One tensor is
converted at a time, so writing needs little memory beyond the model itself.

Tensor types follow llama.cpp: 1-D tensors (norms) stay F32; every matrix, the embedding included,
takes the file's type, except a matrix whose rows are not whole 32-value blocks (F16) and, in a
q4_0 file, the output matrix (the embedding when tied), which llama.cpp keeps at higher precision
(Q6_K there; Q8_0 here, the finest type the gguf package can write).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import gguf
import numpy as np
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from torch import Tensor

from llamita import layout
from llamita.config import Config
from llamita.errors import LlamitaError
from llamita.files import atomic_write, read_json
from llamita.formats.checkpoint import half_to_interleaved, rotary_heads
from llamita.formats.gguf import open_gguf, to_gguf_name
from llamita.formats.load import detect, load_model, read_checkpoint
from llamita.model import Llama

Q, V, T = gguf.GGMLQuantizationType, gguf.GGUFValueType, gguf.TokenType
# --type -> (the matrices' type, general.file_type)
TYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
         "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
Field = tuple[Any, V, Optional[V]]  # a metadata value, its type, and its items' type for an array


def write_gguf(source: str | Path | None, out: Path, type: str = "f16", dtype: torch.dtype | None = None) -> None:
    """``source`` (anything ``load_model`` reads) as a GGUF file of ``type`` at ``out``, atomically."""
    if type not in TYPES:
        raise LlamitaError(f"unknown GGUF type {type!r} (known: {', '.join(TYPES)})")
    vocab_size = read_checkpoint(source).config.vocab_size
    fields = tokenizer_fields(source, vocab_size)  # before the weights load: a missing tokenizer fails at once
    model = load_model(source, dtype=dtype, quantize="none")
    name = _model_name(source)
    atomic_write(out, lambda p: _write(p, model, type, name, fields))


def tensor_type(name: str, shape: tuple[int, ...], type: str, config: Config) -> Q:
    """The GGML type a checkpoint tensor is stored in, in a file of ``type``."""
    matrix = TYPES[type][0]
    if len(shape) == 1:
        return Q.F32
    if matrix != Q.F16 and shape[-1] % gguf.GGML_QUANT_SIZES[matrix][0]:
        return Q.F16  # rows that are not whole blocks cannot be quantized
    output = name == "lm_head.weight" or name == "embed_tokens.weight" and config.tie_embeddings
    return Q.Q8_0 if matrix == Q.Q4_0 and output else matrix


def _tensors(model: Llama) -> dict[str, Tensor]:
    """The model's weights under checkpoint names (fused matrices split), the tied output left out."""
    state = layout.split(dict(model.state_dict()), model.config)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _data(tensor: Tensor, qtype: Q, heads: int | None) -> np.ndarray:
    """One tensor as the bytes GGUF stores: q/k rows in Meta's order, then converted or quantized."""
    w = tensor.detach().float()
    if heads:
        w = half_to_interleaved(w, heads)
    if qtype == Q.F32:
        return w.contiguous().numpy()
    if qtype == Q.F16:
        return w.half().contiguous().numpy()
    return gguf.quants.quantize(w.contiguous().numpy(), qtype)


def _write(path: Path, model: Llama, type: str, name: str, fields: dict[str, Field]) -> None:
    config = model.config
    plan = [(n, t, tensor_type(n, tuple(t.shape), type, config)) for n, t in _tensors(model).items()]
    w = gguf.GGUFWriter(path, "llama")
    try:
        _hyperparameters(w, config, name, TYPES[type][1])
        for key, (value, kind, item) in fields.items():
            w.add_key_value(key, value, kind, item)
        for n, t, qtype in plan:
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(tuple(t.shape), qtype)))
            w.add_tensor_info(to_gguf_name(n), tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for n, t, qtype in plan:
            w.write_tensor_data(_data(t, qtype, rotary_heads(n, config)))
    finally:
        w.close()


def _hyperparameters(w: gguf.GGUFWriter, c: Config, name: str, file_type: int) -> None:
    """The ``llama.*`` keys llama.cpp reads (and ``config_from_gguf`` reads back)."""
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)


def _model_name(source: str | Path | None) -> str:
    fmt, path = detect(source)
    if fmt == "gguf" and "general.name" in (fields := open_gguf(path).fields):
        return str(fields["general.name"].contents())
    return path.stem if fmt == "gguf" else path.name


# -- the tokenizer -----------------------------------------------------------------------------------

def tokenizer_fields(source: str | Path | None, vocab_size: int) -> dict[str, Field]:
    """The ``tokenizer.*`` metadata for ``source``'s tokenizer, its vocabulary ``vocab_size`` long:
    a GGUF's copied as it is; SentencePiece (``tokenizer.model``) as llama.cpp's "llama" model;
    a byte-level BPE ``tokenizer.json`` as its "gpt2" model."""
    from llamita.tokenizer import load_tokenizer

    fmt, path = detect(source)
    if fmt == "gguf":
        return _copied(path, vocab_size)
    tok = load_tokenizer(source)
    bpe = _read_bpe(path / "tokenizer.json") if fmt == "hf" and (path / "tokenizer.json").is_file() else None
    spm_file = path / "tokenizer.model" if fmt == "hf" else Path(tok.source)
    if bpe is not None and bpe["model"].get("type") == "BPE" and _pre(bpe) is not None:
        fields, entries = _bpe(bpe)
    elif spm_file.is_file():
        fields, entries = _sentencepiece(spm_file, path / "tokenizer.json" if fmt == "hf" else None)
    else:
        raise LlamitaError(f"{path}: tokenizer.json is not a byte-level BPE llama.cpp knows (pre-tokenizer gpt-2, "
                           "smollm or llama-bpe) and there is no tokenizer.model: nothing to write as GGUF's tokenizer")
    if entries and max(entries) >= vocab_size:
        raise LlamitaError(f"{path}: the tokenizer has token id {max(entries)}, beyond the model's {vocab_size} "
                           "embeddings")
    # ids the tokenizer leaves unused get placeholder tokens, as llama.cpp's converters write them
    rows = [entries.get(i, (f"[PAD{i}]", T.UNUSED, -1000.0)) for i in range(vocab_size)]
    fields["tokenizer.ggml.tokens"] = ([r[0] for r in rows], V.ARRAY, V.STRING)
    fields["tokenizer.ggml.token_type"] = ([int(r[1]) for r in rows], V.ARRAY, V.INT32)
    if fields["tokenizer.ggml.model"][0] == "llama":
        fields["tokenizer.ggml.scores"] = ([float(r[2]) for r in rows], V.ARRAY, V.FLOAT32)
    for key, token_id in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)):
        if token_id is not None:
            fields[f"tokenizer.ggml.{key}"] = (token_id, V.UINT32, None)
    fields["tokenizer.ggml.add_bos_token"] = (bool(tok.add_bos), V.BOOL, None)
    fields["tokenizer.ggml.add_eos_token"] = (False, V.BOOL, None)
    if tok.chat_template:
        fields["tokenizer.chat_template"] = (tok.chat_template, V.STRING, None)
    return fields


def _copied(path: Path, vocab_size: int) -> dict[str, Field]:
    fields = {k: (f.contents(), V(f.types[0]), V(f.types[-1]) if f.types[0] == V.ARRAY else None)
              for k, f in open_gguf(path).fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens", ([],))[0]
    if "tokenizer.ggml.model" not in fields or not tokens:
        raise LlamitaError(f"{path}: no tokenizer in this GGUF file (tokenizer.ggml.model or .tokens missing)")
    if len(tokens) != vocab_size:
        raise LlamitaError(f"{path}: the tokenizer has {len(tokens)} tokens but the model {vocab_size} embeddings")
    return fields


def _read_bpe(file: Path) -> dict[str, Any]:
    data = read_json(file)
    if not isinstance(data.get("model"), dict):
        raise LlamitaError(f"{file}: missing field 'model'")
    return data


def _pre(data: dict[str, Any]) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a tokenizer.json's byte-level pre-tokenizer."""
    from llamita.tokenizer import LLAMA3_SPLIT

    def byte_level(p: dict, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex

    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and byte_level(steps[0], True):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1], True):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], False) \
            and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    return None


def _added(data: dict[str, Any]) -> dict[int, tuple[str, T, float]]:
    """tokenizer.json's added tokens: special ones are CONTROL, the rest USER_DEFINED (as llama.cpp's
    converter marks them)."""
    return {int(t["id"]): (t["content"], T.CONTROL if t.get("special") else T.USER_DEFINED, -1000.0)
            for t in data.get("added_tokens") or [] if "id" in t and "content" in t}


def _bpe(data: dict[str, Any]) -> tuple[dict[str, Field], dict[int, tuple[str, T, float]]]:
    model = data["model"]
    entries = {int(i): (token, T.NORMAL, 0.0) for token, i in (model.get("vocab") or {}).items()}
    entries.update(_added(data))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise LlamitaError("tokenizer.json: a BPE model without merges")
    fields: dict[str, Field] = {"tokenizer.ggml.model": ("gpt2", V.STRING, None),
                                "tokenizer.ggml.pre": (_pre(data), V.STRING, None),
                                "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING)}
    return fields, entries


def _sentencepiece(file: Path, tokenizer_json: Path | None) -> tuple[dict[str, Field], dict[int, tuple[str, T, float]]]:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(file.read_bytes())
    except Exception as e:  # protobuf's DecodeError, or an OSError
        raise LlamitaError(f"{file}: not a SentencePiece model ({type(e).__name__}: {e})") from None
    # SentencePiece's piece types are GGUF's token types, number for number (NORMAL 1 ... BYTE 6)
    entries = {i: (p.piece, T(p.type), p.score) for i, p in enumerate(proto.pieces)}
    if tokenizer_json is not None and tokenizer_json.is_file():  # tokens added on top, e.g. by fine-tuning
        entries.update({i: t for i, t in _added(read_json(tokenizer_json)).items() if i >= len(proto.pieces)})
    fields: dict[str, Field] = {
        "tokenizer.ggml.model": ("llama", V.STRING, None),
        "tokenizer.ggml.add_space_prefix": (bool(proto.normalizer_spec.add_dummy_prefix), V.BOOL, None)}
    if 0 <= proto.trainer_spec.unk_id < len(proto.pieces):
        fields["tokenizer.ggml.unknown_token_id"] = (proto.trainer_spec.unk_id, V.UINT32, None)
    return fields, entries
