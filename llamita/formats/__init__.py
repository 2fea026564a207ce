"""Checkpoint formats: ``hf``, ``meta`` and ``gguf`` each turn files into a ``Checkpoint`` (a Config
and a stream of tensors, ``checkpoint.py``); ``load.py`` builds the model from one and writes it
back; ``export.py`` writes merged checkpoints. Re-exported lazily, so that a format module never
imports its own package's loader.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"detect": "load", "read_checkpoint": "load", "load_model": "load", "model_from_checkpoint": "load",
            "save_model": "load", "Checkpoint": "checkpoint", "interleaved_to_half": "checkpoint"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llamita.formats' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llamita.formats.{_EXPORTS[name]}"), name)
