"""llamita: run, chat with, fine-tune and serve Llama 2 models in plain PyTorch.

The public API, re-exported lazily: ``import llamita`` costs nothing until a name is used, and no
module of the package depends on this one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Config": "llamita.config", "LLM": "llamita.llm", "Llama": "llamita.model", "LlamitaError": "llamita.errors",
    "SamplingParams": "llamita.sampling", "convert": "llamita.formats.export", "encode_chat": "llamita.chat",
    "evaluate": "llamita.eval",
    "finetune": "llamita.train", "pretrain": "llamita.pretraining", "load_model": "llamita.formats",
    "load_tokenizer": "llamita.tokenizer",
    "save_model": "llamita.formats", "train_tokenizer": "llamita.tokenizer_train",
}
__all__ = ["Config", "LLM", "Llama", "LlamitaError", "SamplingParams", "convert", "encode_chat", "evaluate",
           "finetune", "pretrain",
           "load_model", "load_tokenizer", "save_model", "train_tokenizer"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from llamita.chat import encode_chat
    from llamita.config import Config
    from llamita.errors import LlamitaError
    from llamita.eval import evaluate
    from llamita.formats import load_model, save_model
    from llamita.formats.export import convert
    from llamita.llm import LLM
    from llamita.model import Llama
    from llamita.pretraining import pretrain
    from llamita.sampling import SamplingParams
    from llamita.tokenizer import load_tokenizer
    from llamita.tokenizer_train import train_tokenizer
    from llamita.train import finetune


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llamita' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
