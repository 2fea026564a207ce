"""Evaluation: perplexity, multiple choice (lm-evaluation-harness's conventions), extractive QA and
language adherence, each a small module whose ``run(llm, data, ...)`` returns a ``Result``.

``evaluate`` loads a model and runs one task: the Python face of ``llamita eval``. A task reads its
data before it loads the model (``loaded``), so a bad file is reported at once.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from llamita.errors import LlamitaError
from llamita.eval.report import Result

TASKS = ("perplexity", "choice", "qa", "lang")


def evaluate(task: str, data: str | Path | list[str | Path], llm: Any = None, *, model: str | Path | None = None,
             adapter: str | Path | None = None, quantize: str = "auto", **options: Any) -> Result:
    """Run ``task`` ("perplexity", "choice", "qa" or "lang") on ``data`` (a file, or files for
    perplexity) with ``llm`` (an ``LLM``, or a function that loads one), else the model loaded from
    ``model`` / ``adapter`` / ``quantize`` as ``LLM.load`` does. ``options``: the task's own
    (``mode``, ``format``, ``lang``...) and the common ``limit``, ``batch_size``, ``seed``."""
    if task not in TASKS:
        raise LlamitaError(f"unknown evaluation task {task!r} (known: {', '.join(TASKS)})")
    if llm is None:
        def llm() -> Any:
            from llamita.llm import LLM

            return LLM.load(model, adapter=adapter, quantize=quantize)
    return importlib.import_module(f"llamita.eval.{task}").run(llm, data, **options)


def loaded(llm: Any | Callable[[], Any]) -> Any:
    """The ``LLM`` itself, or the one its loader returns (called once the data has been read)."""
    return llm() if callable(llm) else llm
