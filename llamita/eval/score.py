"""Log-likelihoods of continuations, many sequences per forward pass: the one scoring primitive
of perplexity and multiple choice. Its log-softmax gather, ``token_logprobs``, is the one the
server's ``logprobs`` use too (``llamita/logprobs.py``).

An item is a context and one or more continuations of it. The continuations are packed after
their shared context in one row, each placed at the positions right after the context and
attending to the context and to itself only (a tree mask), so a question with four answers runs
its question once. A continuation's last token is never fed (nothing is predicted from it), and
logits are computed only where a continuation token is predicted. So a context and continuation
fit when together they are at most one token longer than the context window, as in lm-eval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from llamita.logprobs import token_logprobs
from llamita.model import Llama


@dataclass
class Item:
    context: list[int]  # at least one token: what the first continuation token is predicted from
    continuations: list[list[int]]

    @property
    def length(self) -> int:
        """Tokens fed to the model."""
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)

    @property
    def predicted(self) -> int:
        """Positions whose logits are needed."""
        return 1 + sum(len(c) - 1 for c in self.continuations)


@dataclass
class Scored:
    """One continuation's scores."""

    logprobs: Tensor  # float64 [len(continuation)]: log p(token | everything before it)
    greedy: bool  # every token was the most likely one

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())


LOGITS_BUDGET = 1 << 28  # floats of logits per forward pass (1 GiB): long windows x big vocabularies


def score(model: Llama, items: list[Item], batch_size: int = 8, desc: str | None = None) -> list[list[Scored]]:
    """Per item, per continuation: its tokens' log-probabilities given the context (and the
    continuation's earlier tokens). Items run longest first, up to ``batch_size`` per forward
    pass, fewer where their logits would pass ``LOGITS_BUDGET``; ``desc``: a progress bar."""
    for it in items:
        if not it.context or not all(it.continuations):
            raise ValueError("an item needs a context token and non-empty continuations")
    order = sorted(range(len(items)), key=lambda i: -items[i].length)
    results: list[list[Scored]] = [[] for _ in items]
    device = model.norm.weight.device
    with torch.inference_mode(), tqdm(total=len(items), desc=desc, disable=desc is None, unit="item") as bar:
        for batch in _batches(order, items, batch_size, model.config.vocab_size):
            for i, scored in zip(batch, _score_batch(model, [items[i] for i in batch], device)):
                results[i] = scored
            bar.update(len(batch))
    return results


def _batches(order: list[int], items: list[Item], batch_size: int, vocab: int) -> Iterator[list[int]]:
    """Consecutive runs of ``order``: up to ``batch_size`` items whose logits fit the budget."""
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or
                      sum(items[j].predicted for j in batch + [i]) * vocab > LOGITS_BUDGET):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _score_batch(model: Llama, batch: list[Item], device: torch.device) -> list[list[Scored]]:
    T = max(it.length for it in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    positions = torch.zeros(len(batch), T, dtype=torch.long)
    keep = torch.zeros(len(batch), T, dtype=torch.bool)  # where logits are needed
    branched = any(len(it.continuations) > 1 for it in batch)
    mask = torch.zeros(len(batch), 1, T, T, dtype=torch.bool) if branched else None
    targets: list[list[Tensor]] = []  # per item, per continuation
    for b, it in enumerate(batch):
        c = len(it.context)
        row = it.context + [t for cont in it.continuations for t in cont[:-1]]
        ids[b, : len(row)] = torch.tensor(row)
        positions[b, :c] = torch.arange(c)
        keep[b, c - 1] = True  # predicts every continuation's first token
        if mask is not None:
            mask[b, 0, :c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
        at = c
        for cont in it.continuations:
            n = len(cont) - 1  # fed: all but the last
            positions[b, at: at + n] = torch.arange(c, c + n)
            keep[b, at: at + n] = True
            if mask is not None:
                mask[b, 0, at: at + n, :c] = True
                mask[b, 0, at: at + n, at: at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            at += n
        if mask is not None:  # padding sees itself, so that no row of the softmax is empty
            pad = torch.arange(len(row), T)
            mask[b, 0, pad, pad] = True
        targets.append([torch.tensor(cont) for cont in it.continuations])
    logits = model(ids.to(device), positions.to(device), mask=None if mask is None else mask.to(device),
                   logits_at=keep.to(device)).float().cpu()
    out, row_start = [], 0
    for b in range(len(batch)):
        n_kept = int(keep[b].sum())
        rows = logits[row_start: row_start + n_kept]  # the context's last, then each continuation's but last
        row_start += n_kept
        scored, at = [], 1
        for target in targets[b]:
            n = len(target)
            cont_rows = torch.cat([rows[:1], rows[at: at + n - 1]])
            at += n - 1
            logp = token_logprobs(cont_rows, target)
            scored.append(Scored(logp.logprobs.double(), bool(logp.greedy.all())))
        out.append(scored)
    return out
