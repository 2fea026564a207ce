"""Exports: a base with a LoRA adapter folded in, as a Hugging Face checkpoint with its tokenizer; any
checkpoint converted to GGUF (llama.cpp, Ollama) or to the Hugging Face layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from llamita.errors import LlamitaError
from llamita.files import atomic_write
from llamita.formats import detect, load_model, save_model
from llamita.formats.hf import trained_template


def merge(base: str | Path | None, adapter: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> None:
    """``llamita merge``: the base with the adapter folded in, as a Hugging Face checkpoint with the
    base's tokenizer (and the adapter's training template), which llamita and transformers load."""
    from llamita.peft import adapter_template, load_adapter

    model = load_model(base, dtype=dtype)
    load_adapter(model, adapter, merge=True)
    save_model(model, out, template=adapter_template(adapter))
    write_tokenizer(base, out)


GGUF_TYPES = ("f16", "q8_0", "q4_0")


def convert(source: str | Path | None, out: str | Path, type: str | None = None,
            dtype: torch.dtype | None = None) -> Path:
    """``llamita convert``: ``source`` (anything ``load_model`` reads) written to ``out``: a ``.gguf``
    file of ``type`` f16, q8_0 or q4_0 (default f16), replaced atomically if it exists; otherwise a
    directory in the Hugging Face layout (``type`` "hf", the default there) with the tokenizer.
    ``dtype``: the dtype the weights load in (and a Hugging Face output stores); default the source's."""
    out = Path(out).expanduser()
    to_gguf = out.suffix.lower() == ".gguf"
    type = type or ("f16" if to_gguf else "hf")
    if type not in (*GGUF_TYPES, "hf"):
        raise LlamitaError(f"unknown --type {type!r} (known: {', '.join(GGUF_TYPES)}, hf)")
    if to_gguf != (type != "hf"):
        raise LlamitaError(f"{out}: --type {type} writes " + ("a directory, not a .gguf file" if type == "hf" else
                                                               "a .gguf file: give OUT ending in .gguf"))
    if out.exists() and out.is_dir() == to_gguf:
        raise LlamitaError(f"{out}: exists and is {'a directory' if to_gguf else 'not a directory'}")
    if to_gguf:
        from llamita.formats.gguf_write import write_gguf

        write_gguf(source, out, type, dtype)
        return out
    fmt, path = detect(source)
    model = load_model(source, dtype=dtype, quantize="none")
    save_model(model, out, template=trained_template(path) if fmt == "hf" else None)
    write_tokenizer(source, out)
    return out


def write_tokenizer(source: str | Path | None, directory: str | Path) -> None:
    """The tokenizer of ``source`` as Hugging Face files: ``tokenizer.model`` (SentencePiece) or
    ``tokenizer.json``, with ``tokenizer_config.json`` carrying the special tokens and chat template."""
    from llamita.tokenizer import load_tokenizer, sentencepiece_model_from_gguf

    fmt, path = detect(source)
    directory = Path(directory)
    if fmt == "hf":
        copy_tokenizer_files(path, directory)
        return
    tok = load_tokenizer(source)
    if tok.kind == "sentencepiece":
        model = sentencepiece_model_from_gguf(path) if fmt == "gguf" else Path(tok.source).read_bytes()
        atomic_write(directory / "tokenizer.model", lambda p: p.write_bytes(model))
        cls = "LlamaTokenizer"
    else:
        atomic_write(directory / "tokenizer.json", tok.save_tokenizer_json)
        cls = "PreTrainedTokenizerFast"
    name = lambda i: tok.id_to_token(i) if i is not None else None  # noqa: E731
    more = {"chat_template": tok.chat_template} if tok.chat_template else {}
    write_tokenizer_config(directory, cls, bos=name(tok.bos_id), eos=name(tok.eos_id), add_bos=tok.add_bos, **more)


def write_tokenizer_config(directory: Path, tokenizer_class: str, *, bos: str | None, eos: str | None,
                           add_bos: bool, **more: Any) -> None:
    """``tokenizer_config.json`` for transformers: the special tokens, BOS without EOS, and ``legacy``
    true so that each stretch of text between special tokens gets SentencePiece's dummy prefix, as
    llamita and llama.cpp encode it. ``more``: further keys (chat_template...)."""
    config = {"tokenizer_class": tokenizer_class, "bos_token": bos, "eos_token": eos,
              "add_bos_token": add_bos, "add_eos_token": False, "legacy": True, **more}
    atomic_write(directory / "tokenizer_config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def copy_tokenizer_files(source: Path, directory: Path) -> None:
    """A Hugging Face tokenizer's files (a checkpoint's, or ``llamita tokenizer train``'s), copied as they
    are: nothing is lost."""
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():
            atomic_write(directory / name, lambda p, src=source / name: shutil.copyfile(src, p))
