"""A task's result: its metrics (the JSON file's top-level keys), the settings that produced them,
and what else a reader needs (examples, timings); printed as a markdown table."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamita.errors import LlamitaError
from llamita.files import atomic_write
from llamita.options import option


@dataclass
class Common:
    """The options every task takes."""

    limit: int | None = option(None, "evaluate the first N items (documents, questions, prompts) only")
    batch_size: int = option(8, "sequences scored or generated together")
    seed: int = option(1234, "few-shot sampling and generation seed")

    def __post_init__(self) -> None:
        for name, value in (("--limit", self.limit), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise LlamitaError(f"{name} must be at least 1, not {value}")


@dataclass
class Result:
    task: str
    metrics: dict[str, float | int]
    settings: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)  # examples, per-item scores...

    def as_json(self) -> dict[str, Any]:
        return {**self.metrics, "task": self.task, "settings": self.settings, **self.details}

    def markdown(self) -> str:
        """A table of the metrics, then the settings on one line."""
        rows = [f"| {name} | {_fmt(value)} |" for name, value in self.metrics.items()]
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items() if v is not None)
        return "\n".join([f"| {self.task} | value |", "|---|---|", *rows, "", settings])

    def save(self, path: str | Path) -> None:
        text = json.dumps(self.as_json(), indent=2, ensure_ascii=False) + "\n"
        atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fmt(value: float | int) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Timer:
    """Seconds and tokens per second for a result's ``details``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def details(self, tokens: int) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        return {"seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0}
