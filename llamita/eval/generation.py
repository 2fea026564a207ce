"""What the generative tasks (qa, lang) share: replies to chat prompts generated in batches with a
progress bar, the generated-token count for the timings, and the settings a result records."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

from tqdm import tqdm

from llamita.chat import Message, resolve_template
from llamita.errors import LlamitaError

T = TypeVar("T")


def first(items: list[T], limit: int | None) -> list[T]:
    """The first ``limit`` items (all when None): ``--limit`` of every task."""
    return items if limit is None else items[:limit]


def replies(llm: Any, conversations: Sequence[list[Message]], wheres: Sequence[str], batch_size: int, desc: str,
            **sampling: Any) -> list[str]:
    """The assistant's reply to each conversation, ``batch_size`` at a time through
    ``llm.chat_batch``; a progress bar on stderr counts the items. A prompt the model cannot take
    (longer than its context) is reported with its record's ``where``."""
    out: list[str] = []
    with tqdm(total=len(conversations), desc=desc, unit="item") as bar:
        for start in range(0, len(conversations), batch_size):
            batch = list(conversations[start: start + batch_size])
            try:
                out += llm.chat_batch(batch, **sampling)
            except LlamitaError as e:
                raise LlamitaError(f"{_culprit(llm, batch, wheres[start:], sampling)}: {e}") from None
            bar.update(len(batch))
    return out


def _culprit(llm: Any, batch: list[list[Message]], wheres: Sequence[str], sampling: dict[str, Any]) -> str:
    """The record whose request failed in a batch (chat_batch does not say which)."""
    for where, messages in zip(wheres, batch):
        try:
            llm.request(llm.encode_chat(messages), **sampling)
        except LlamitaError:
            return where
    return f"{wheres[0]} .. {wheres[len(batch) - 1]}"


def generated_tokens(llm: Any, texts: Sequence[str]) -> int:
    """The replies' length in tokens (re-encoded: the stop token is not counted). A control token the
    reply wrote was decoded as its text, and counts as the one token it was (``special=True``, as
    lm-eval's HF backend, through transformers' tokenizer, counts it)."""
    return sum(len(llm.tokenizer.encode(t, special=True)) for t in texts)


def settings(options: Any, llm: Any, data: str | Path) -> dict[str, Any]:
    """Every option, the data file and the chat format the prompts were rendered in."""
    return {"data": str(data), **dataclasses.asdict(options), "template": resolve_template(llm.tokenizer, llm.template)}
