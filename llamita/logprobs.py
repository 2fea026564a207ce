"""Log-probabilities of tokens: the log-softmax gather that evaluation (``eval/score.py``) and the
server's ``logprobs`` share, and what one request collects of them as it runs.

It lives below ``generate`` (a ``Request`` collects its own) and below ``eval`` (whose package
imports ``llm``, which imports ``generate``), so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

ROWS_AT_ONCE = 256  # prompt positions scored per softmax: a long prompt's [T, vocab] float32 is not copied whole


class TokenLogprobs(NamedTuple):
    logprobs: Tensor  # [N]: log p(target)
    greedy: Tensor  # bool [N]: the target is the row's argmax
    top_logprobs: Tensor  # [N, top]: the row's highest log-probabilities, best first
    top_ids: Tensor  # long [N, top]: their tokens


def token_logprobs(logits: Tensor, targets: Tensor, top: int = 0) -> TokenLogprobs:
    """log p(target) at each row of ``logits`` [N, vocab] (float32 softmax whatever the model's
    dtype), whether the target is the row's argmax, and the row's ``top`` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = logp.topk(top, dim=-1)
    return TokenLogprobs(logp.gather(-1, targets[:, None])[:, 0], logits.argmax(-1) == targets, best.values,
                         best.indices)


@dataclass(frozen=True)
class Entry:
    """One token of a request with its log-probability and the most likely tokens at its place;
    both None for a prompt's first token, which nothing predicts."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Logprobs:
    """The log-probabilities a request reports (OpenAI's ``logprobs`` and ``echo``), collected as it runs."""

    top: int  # alternatives per position
    prompt: bool = False  # the prompt's tokens too (``echo``): the request runs its whole prompt
    entries: list[Entry] = field(default_factory=list)

    def add(self, logits: Tensor, targets: list[int]) -> None:
        """Score ``targets``, each predicted by its row of ``logits`` [N, vocab]."""
        for rows, ids in zip(logits.split(ROWS_AT_ONCE), torch.tensor(targets, dtype=torch.long).split(ROWS_AT_ONCE)):
            scored = token_logprobs(rows, ids.to(rows.device), self.top)
            for token, logprob, values, tops in zip(ids.tolist(), scored.logprobs.tolist(),
                                                    scored.top_logprobs.tolist(), scored.top_ids.tolist()):
                self.entries.append(Entry(token, logprob, list(zip(tops, values))))

    def add_prompt(self, logits: Tensor, prompt_ids: list[int]) -> None:
        """The prompt's tokens: the first unscored, the rest from ``logits`` [len(prompt) - 1, vocab]."""
        self.entries.append(Entry(prompt_ids[0], None, None))
        if len(prompt_ids) > 1:
            self.add(logits, prompt_ids[1:])
