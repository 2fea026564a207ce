"""Shared fixtures: the embedded default model, and transformers' load of it as the oracle."""

from __future__ import annotations

import pytest
import torch

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


@pytest.fixture(scope="session")
def hf_smol(default_gguf):
    """transformers' tokenizer built from the same GGUF."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="session")
def default_model(default_gguf):
    return llamita.load_model(default_gguf, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_default_model(default_gguf):
    """transformers' own load of the same GGUF: the reference nobody here wrote."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def default_llm(default_model, smol):
    return llamita.LLM(default_model, smol)
