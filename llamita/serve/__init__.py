"""``llamita serve``: an OpenAI-compatible HTTP server over one model, with continuous batching.

``app.py`` holds the routes and the OpenAI shapes, ``engine.py`` the thread that batches requests.
"""

from __future__ import annotations

from pathlib import Path

from llamita.assets import DEFAULT_MODEL_NAME
from llamita.llm import LLM
from llamita.serve.app import create_app
from llamita.serve.engine import Engine

__all__ = ["Engine", "create_app", "serve"]


def serve(llm: LLM, *, source: str | None = None, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve ``llm`` until interrupted; ``options`` go to ``create_app`` (max_batch, max_queue, max_seq_len, max_prefill_tokens)."""
    import uvicorn

    name = Path(source).name if source else DEFAULT_MODEL_NAME
    uvicorn.run(create_app(llm, model_name=name, **options), host=host, port=port, log_level="info")
