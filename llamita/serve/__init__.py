"""``llamita serve``: an OpenAI-compatible HTTP server over one model, with continuous batching.

``app.py`` holds the app and its error handling, ``routes.py`` the routes and OpenAI's shapes,
``engine.py`` the thread that batches requests. ``serve``, ``create_app``, ``Engine`` and
``EngineConfig`` are re-exported here, lazily (so that no module of the package imports this one).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"serve": "app", "create_app": "app", "Engine": "engine", "EngineConfig": "engine"}
__all__ = ["Engine", "EngineConfig", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llamita.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llamita.serve.{_EXPORTS[name]}"), name)
