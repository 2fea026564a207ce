"""Exports: a base with a LoRA adapter folded in, as a Hugging Face checkpoint with its tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from llamita.files import atomic_write
from llamita.formats import detect, load_model, save_model


def merge(base: str | Path | None, adapter: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> None:
    """``llamita merge``: the base with the adapter folded in, as a Hugging Face checkpoint with the
    base's tokenizer (and the adapter's training template), which llamita and transformers load."""
    from llamita.peft import adapter_template, load_adapter

    model = load_model(base, dtype=dtype)
    load_adapter(model, adapter, merge=True)
    save_model(model, out, template=adapter_template(adapter))
    write_tokenizer(base, out)


def write_tokenizer(source: str | Path | None, directory: str | Path) -> None:
    """The tokenizer of ``source`` as Hugging Face files: ``tokenizer.model`` (SentencePiece) or
    ``tokenizer.json``, with ``tokenizer_config.json`` carrying the special tokens and chat template."""
    from llamita.tokenizer import load_tokenizer, sentencepiece_model_from_gguf

    fmt, path = detect(source)
    directory = Path(directory)
    if fmt == "hf":  # copy the files as they are: nothing is lost
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "generation_config.json"):
            if (path / name).is_file():
                atomic_write(directory / name, lambda p, src=path / name: shutil.copyfile(src, p))
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
    config = {"tokenizer_class": cls, "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id),
              "add_bos_token": tok.add_bos, "add_eos_token": False, "legacy": True}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    atomic_write(directory / "tokenizer_config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
