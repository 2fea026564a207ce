"""Evaluation: perplexity, multiple choice (lm-evaluation-harness's conventions), extractive QA and
language adherence, each a small module whose ``run(llm, data, ...)`` returns a ``Result``.

``evaluate`` loads a model and runs one task: the Python face of ``llamita eval``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from llamita.errors import LlamitaError
from llamita.eval.report import Result

TASKS = ("perplexity", "choice", "qa", "lang")


def evaluate(task: str, data: str | Path | list[str | Path], llm: Any = None, *, model: str | Path | None = None,
             adapter: str | Path | None = None, quantize: str = "auto", **options: Any) -> Result:
    """Run ``task`` ("perplexity", "choice", "qa" or "lang") on ``data`` (a file, or files for
    perplexity) with ``llm`` (an ``LLM``), or the model loaded from ``model`` / ``adapter`` /
    ``quantize`` as ``LLM.load`` does. ``options``: the task's own (``mode``, ``format``, ``lang``...)
    and the common ``limit``, ``batch_size``, ``seed``."""
    if task not in TASKS:
        raise LlamitaError(f"unknown evaluation task {task!r} (known: {', '.join(TASKS)})")
    if llm is None:
        from llamita.llm import LLM

        llm = LLM.load(model, adapter=adapter, quantize=quantize)
    return importlib.import_module(f"llamita.eval.{task}").run(llm, data, **options)
