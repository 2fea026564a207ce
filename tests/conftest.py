"""Shared fixtures: the embedded default model, and transformers' load of it as the oracle."""

from __future__ import annotations

import pytest
import torch

import llamita
from llamita import assets


@pytest.fixture(scope="session")
def default_gguf():
    return assets.default_model_path()


@pytest.fixture(scope="session")
def default_model(default_gguf):
    return llamita.load_model(default_gguf, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_default_model(default_gguf):
    """transformers' own load of the same GGUF: the reference nobody here wrote."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32)
    return model.eval()
