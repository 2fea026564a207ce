"""Log-likelihoods of token sequences, many per forward pass: the one scoring primitive of
perplexity and multiple choice. Its log-softmax gather, ``token_logprobs``, is the one the
server's ``logprobs`` use too (``llamita/logprobs.py``).

A sequence is scored from a given token on: each of those tokens' log-probability given all the
tokens before it. Sequences that start alike (a question's answers after the question, questions
after the same few-shot examples, answers sharing their first words) are packed into one row as a
token tree: each token is fed once, at the position its depth gives it, attending to its
ancestors only, so shared tokens are computed once. A sequence's last token is never fed (nothing
is predicted from it), and logits are computed only where a scored token is predicted. So a
sequence fits when it is at most one token longer than the context window, as in lm-eval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from llamita.logprobs import token_logprobs
from llamita.model import Llama

LOGITS_BUDGET = 1 << 28  # floats of logits per forward pass (1 GiB): long windows x big vocabularies
ROW_TOKENS = 1024  # a row grows past one sequence only up to this: every token attends over the whole row


@dataclass
class Scored:
    """One sequence's scores."""

    logprobs: Tensor  # float64 [scored tokens]: log p(token | everything before it)
    greedy: bool  # every scored token was the most likely one

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())


@dataclass
class Row:
    """A token tree: node i holds ``tokens[i]`` under ``parents[i]`` (-1: the root) at position
    ``depths[i]``; ``scored`` lists, per sequence, (its index, the nodes predicting its scored
    tokens, those tokens)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict)
    scored: list[tuple[int, list[int], list[int]]] = field(default_factory=list)

    def shared(self, ids: list[int]) -> int:
        """How many of ``ids``' first tokens the tree holds already."""
        node = -1
        for n, t in enumerate(ids):
            node = self.children.get((node, t), -2)
            if node == -2:
                return n
        return len(ids)

    def add(self, index: int, ids: list[int], first: int) -> None:
        """Sequence ``index``: all but its last token fed, tokens ``first..`` scored."""
        node, path = -1, []
        for depth, t in enumerate(ids[:-1]):
            nxt = self.children.get((node, t))
            if nxt is None:
                nxt = self.children[(node, t)] = len(self.tokens)
                self.tokens.append(t)
                self.parents.append(node)
                self.depths.append(depth)
            node = nxt
            path.append(node)
        self.scored.append((index, path[first - 1:], ids[first:]))

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    @cached_property
    def predictors(self) -> list[int]:
        """The nodes whose logits are needed, in order (asked once the row is packed)."""
        return sorted({n for _, nodes, _ in self.scored for n in nodes})


def pack(sequences: list[tuple[list[int], int]]) -> list[Row]:
    """Consecutive sequences in shared rows while the tokens they share are at least half of what
    they add (and the row stays within ``ROW_TOKENS``)."""
    rows: list[Row] = []
    for i, (ids, first) in enumerate(sequences):
        fed = len(ids) - 1
        row = rows[-1] if rows else None
        if row is not None:
            shared = row.shared(ids[:-1])
            new = fed - shared
            if not (2 * shared >= new and len(row.tokens) + new <= ROW_TOKENS):
                row = None
        if row is None:
            row = Row()
            rows.append(row)
        row.add(i, ids, first)
    return rows


def score(model: Llama, sequences: list[tuple[list[int], int]], batch_size: int = 8,
          desc: str | None = None) -> list[Scored]:
    """Per ``(ids, first)``: the log-probabilities of ``ids[first:]`` (first >= 1), each given the
    tokens before it. Rows (``pack``) run largest first, up to ``batch_size`` per forward pass,
    fewer where their logits would pass ``LOGITS_BUDGET``; ``desc``: a progress bar's label."""
    for ids, first in sequences:
        if not 1 <= first < len(ids):
            raise ValueError(f"cannot score from token {first} of a sequence of {len(ids)}")
    rows = sorted(pack(sequences), key=lambda r: -len(r.tokens))
    results: list[Scored | None] = [None] * len(sequences)
    device = model.norm.weight.device
    with torch.inference_mode(), tqdm(total=len(sequences), desc=desc, disable=desc is None, unit="seq") as bar:
        for batch in _batches(rows, batch_size, model.config.vocab_size):
            for index, scored in _score_batch(model, batch, device):
                results[index] = scored
            bar.update(sum(len(r.scored) for r in batch))
    return results  # type: ignore[return-value]


def _batches(rows: list[Row], batch_size: int, vocab: int) -> Iterator[list[Row]]:
    """Consecutive runs of rows: up to ``batch_size`` whose logits fit the budget."""
    batch: list[Row] = []
    logits = 0
    for row in rows:
        if batch and (len(batch) == batch_size or (logits + len(row.predictors)) * vocab > LOGITS_BUDGET):
            yield batch
            batch, logits = [], 0
        batch.append(row)
        logits += len(row.predictors)
    if batch:
        yield batch


def _score_batch(model: Llama, batch: list[Row], device: torch.device) -> Iterator[tuple[int, Scored]]:
    T = max(len(r.tokens) for r in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    positions = torch.zeros(len(batch), T, dtype=torch.long)
    keep = torch.zeros(len(batch), T, dtype=torch.bool)  # where logits are needed
    chains = all(r.is_chain() for r in batch)
    mask = None if chains else torch.zeros(len(batch), 1, T, T, dtype=torch.bool)
    for b, row in enumerate(batch):
        n = len(row.tokens)
        ids[b, :n] = torch.tensor(row.tokens)
        positions[b, :n] = torch.tensor(row.depths)
        keep[b, row.predictors] = True
        if mask is not None:
            ancestry = mask[b, 0]
            for i, parent in enumerate(row.parents):  # a node sees its parent's ancestors and itself
                if parent >= 0:
                    ancestry[i] = ancestry[parent]
                ancestry[i, i] = True
            ancestry[torch.arange(n, T), torch.arange(n, T)] = True  # padding sees itself: no empty softmax row
    logits = model(ids.to(device), positions.to(device), mask=None if mask is None else mask.to(device),
                   logits_at=keep.to(device)).float().cpu()
    start = 0
    for row in batch:
        predictors = row.predictors
        at = {node: start + k for k, node in enumerate(predictors)}  # node -> its row of ``logits``
        start += len(predictors)
        for index, nodes, targets in row.scored:
            got = token_logprobs(logits[[at[n] for n in nodes]], torch.tensor(targets))
            yield index, Scored(got.logprobs.double(), bool(got.greedy.all()))
