"""Shared fixtures: the embedded default model, and transformers' load of it as the oracle."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The machines have no internet: Hugging Face libraries fail at once instead of retrying the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import llamita
from helpers import llama_cpp_path
from llamita import assets


@pytest.fixture(scope="session")
def default_gguf():
    return assets.default_model_path()


@pytest.fixture(scope="session")
def llama_vocab():
    """Llama 2's tokenizer (llama.cpp's ggml-vocab-llama-spm.gguf), with its test vectors beside it."""
    return llama_cpp_path("models/ggml-vocab-llama-spm.gguf")


@pytest.fixture(scope="session")
def llama(llama_vocab):
    return llamita.load_tokenizer(llama_vocab)


@pytest.fixture(scope="session")
def llama_sp(llama_vocab):
    """sentencepiece itself over that vocabulary: the reference for Llama 2's plain text."""
    import sentencepiece

    from llamita.tokenizer import sentencepiece_model_from_gguf

    return sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model_from_gguf(llama_vocab))


@pytest.fixture(scope="session")
def smol(default_gguf):
    return llamita.load_tokenizer(default_gguf)


def oracle_dir(config: pytest.Config, kind: str, gguf) -> tuple[Path | None, bool]:
    """Where transformers' own load of ``gguf`` is kept between runs (it converts a GGUF for tens of
    seconds; reading its saved result takes one), keyed by the file and transformers' version; and
    whether it is there."""
    import transformers

    if getattr(config, "cache", None) is None:  # -p no:cacheprovider: nothing kept
        return None, False
    stat = gguf.stat()
    key = f"{kind}-{gguf.name}-{stat.st_size}-{int(stat.st_mtime)}-transformers-{transformers.__version__}"
    folder = config.cache.mkdir("hf-oracles") / key
    folder.mkdir(exist_ok=True)
    return folder, (folder / "done").exists()


@pytest.fixture(scope="session")
def hf_smol(default_gguf, pytestconfig):
    """transformers' tokenizer built from the same GGUF."""
    import transformers

    folder, kept = oracle_dir(pytestconfig, "tokenizer", default_gguf)
    if kept:
        return transformers.AutoTokenizer.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    if folder is not None:
        tok.save_pretrained(folder)
        (folder / "done").touch()
    return tok


@pytest.fixture(scope="session")
def default_model(default_gguf):
    return llamita.load_model(default_gguf, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_default_model(default_gguf, pytestconfig):
    """transformers' own load of the same GGUF: the reference nobody here wrote."""
    from transformers import AutoModelForCausalLM

    folder, kept = oracle_dir(pytestconfig, "model", default_gguf)
    if kept:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32)
    if folder is not None:  # save_pretrained refuses a model read from GGUF: its weights and config, then
        from safetensors.torch import save_model

        config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        (folder / "config.json").write_text(json.dumps(config))
        save_model(model, str(folder / "model.safetensors"))
        (folder / "done").touch()
    return model.eval()


@pytest.fixture(scope="session")
def default_llm(default_model, smol):
    return llamita.LLM(default_model, smol)
