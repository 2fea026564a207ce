"""Prefill and decode with a KV cache, for one request or many at once.

A ``Request`` holds everything one generation needs (prompt, sampling, stop rules, the text
emitted so far). ``prefill`` and ``decode_step`` run the model for a set of requests, each in its
own KV-cache row at its own position; they decide the positions, the attention mask and the
cache's span. ``complete`` drives requests to the end in a cache as it is, ``generate`` in a cache
of its own. The server's engine drives the same pieces for requests that come and go.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from llamita.cache import KVCache, causal_mask, common_prefix
from llamita.constrain import Constraint
from llamita.errors import LlamitaError
from llamita.logprobs import Logprobs
from llamita.model import Llama
from llamita.options import option
from llamita.sampling import GREEDY_BELOW, SamplingParams, distribution, sample, verify_draft
from llamita.tokenizer import StreamDecoder, Tokenizer


class StopMatcher:
    """Finds stop strings in streamed text, also when one is split across tokens.

    Text that could still be the start of a stop string is held back until it cannot be. Each stop
    string has a Knuth-Morris-Pratt automaton whose state (how much of it the text ends with) moves
    one character at a time, so a token costs time linear in its new text, however long the stops.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.tables = [_prefix_table(s) for s in stops]
        self.states = [0] * len(stops)  # per stop: the length of its longest prefix the text ends with
        self.pending = ""  # the text held back: its last max(states) characters

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        start = len(self.pending)
        self.pending += text
        for end, char in enumerate(text, start + 1):
            for j, stop in enumerate(self.stops):
                if self._advance(j, char) == len(stop):
                    return self._cut(end - len(stop)), True
        hold = max(self.states, default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out, False

    def _advance(self, j: int, char: str) -> int:
        """Stop ``j``'s state after ``char``."""
        stop, table, k = self.stops[j], self.tables[j], self.states[j]
        while k and stop[k] != char:
            k = table[k - 1]
        self.states[j] = k = k + (stop[k] == char)
        return k

    def _cut(self, at: int) -> str:
        """The text before a stop string found at ``at``; nothing is held any more."""
        out, self.pending, self.states = self.pending[:at], "", [0] * len(self.stops)
        return out

    def flush(self) -> str:
        return self._cut(len(self.pending))


def _prefix_table(s: str) -> list[int]:
    """KMP's failure function: for each s[:i+1], the length of its longest proper prefix that is also its suffix."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table


@dataclass
class Request:
    """One generation: its prompt, how it samples, and what it has produced so far."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    tokenizer: Tokenizer
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, end of turn or stop string) or "length"
    logprobs: Logprobs | None = None  # the log-probabilities to collect, if asked for
    prompt_only: bool = False  # run the prompt and generate nothing (to score it): params.max_new_tokens unused
    constraint: Constraint | None = None  # a grammar the output must follow (JSON of a schema); done = "stop"

    def __post_init__(self) -> None:
        self.generator = self.params.generator()
        self.decoder = StreamDecoder(self.tokenizer)
        self.matcher = StopMatcher(self.params.stop)
        self.seen: Tensor | None = None  # tokens present so far, for the repetition penalty

    @property
    def position(self) -> int:
        """Where the next token fed to the model stands."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def fed_ids(self) -> list[int]:
        """The tokens whose keys and values its cache row holds once it is done (the last one
        sampled was never fed)."""
        return self.prompt_ids + self.output_ids[:-1]

    @property
    def scores_prompt(self) -> bool:
        """Whether it needs the logits at every prompt position (so it runs its prompt from position 0)."""
        return self.logprobs is not None and self.logprobs.prompt

    def step(self, logits: Tensor, max_seq_len: int) -> str:
        """Pick the next token from ``logits`` [vocab] and take it (``accept``); a prompt-only
        request finishes instead."""
        if self.prompt_only:
            self.finish_reason = "length"
            return ""
        return self.accept(self.next_token(logits), max_seq_len)

    def next_token(self, logits: Tensor, draft: int | None = None, q: Tensor | None = None) -> int:
        """A token sampled from ``logits`` [vocab], its log-probability recorded if asked for
        (before ``accept``, so that a stop token has its entry too). A constraint masks a copy:
        sampling sees the allowed tokens only, the log-probabilities are the model's own.

        ``draft``: a token a draft proposed from its distribution ``q`` (None: for certain), kept or
        replaced by the rejection rule (``verify_draft``): the token is distributed as sampling from
        ``logits`` would have it, and under greedy decoding it is that very token."""
        if self.params.repetition_penalty != 1.0 and self.seen is None:
            # Sized by the model's vocabulary, which may exceed the tokenizer's (padded embeddings).
            self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            self.seen[torch.tensor(self.prompt_ids + self.output_ids, dtype=torch.long)] = True
        row = logits.cpu()
        if self.constraint is not None:  # numpy's copy: one thread (see Constraint.mask)
            row = self.constraint.mask(torch.from_numpy(row.float().numpy().copy()))
        if draft is None:
            token = sample(row, self.params, self.generator, self.seen)
        else:
            token = verify_draft(distribution(row, self.params, self.seen), q, draft, self.generator)
        if self.logprobs is not None:
            self.logprobs.add(logits[None], [token])
        return token

    def accept(self, token: int, max_seq_len: int) -> str:
        """Take a sampled token; return the new text (possibly empty) and set finish_reason when done."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.decoder.flush() + self.matcher.flush()
        self.output_ids.append(token)
        if self.seen is not None and token < self.seen.shape[0]:
            self.seen[token] = True
        if self.constraint is not None:
            self.constraint.advance(token)
        text, stopped = self.matcher.push(self.decoder.push(token))
        if stopped:
            self.finish_reason = "stop"
        elif self.constraint is not None and self.constraint.done:
            text += self._end("stop")
        elif len(self.output_ids) >= self.params.max_new_tokens or self.position + 1 >= max_seq_len:
            text += self._end("length")
        return text

    def _end(self, reason: str) -> str:
        """Finish for ``reason`` with whatever text is held back (a stop string in it finishes as "stop")."""
        tail, stopped = self.matcher.push(self.decoder.flush())
        self.finish_reason = "stop" if stopped else reason
        return tail if stopped else tail + self.matcher.flush()


def prefill(model: Llama, cache: KVCache, requests: list[Request], rows: Tensor | None = None,
            cached: list[int] | None = None) -> Tensor:
    """Run the prompts (right-padded together) into ``cache`` (its first rows, or ``rows``);
    logits [n, vocab] at each one's end. A request that scores its prompt gets the logits at its
    other positions too (``Request.scores_prompt``).

    ``cached``: per request, how many of its first prompt tokens its cache row already holds (a
    prefix it shares with an earlier request there): only the rest is run, from that position.
    """
    cached = cached or [0] * len(requests)
    if any(r.scores_prompt and n for r, n in zip(requests, cached)):
        raise ValueError("a request that scores its prompt must run it from position 0")
    rests = [r.prompt_ids[n:] for r, n in zip(requests, cached)]
    T = max(map(len, rests))
    ids = torch.zeros(len(requests), T, dtype=torch.long)
    keep = torch.zeros(len(requests), T, dtype=torch.bool)  # where logits are needed
    for i, (r, rest) in enumerate(zip(requests, rests)):
        ids[i, : len(rest)] = torch.tensor(rest)
        keep[i, 0 if r.scores_prompt else len(rest) - 1: len(rest)] = True
    # Padding past the cache's end writes (to be overwritten) in its last slot.
    positions = (torch.tensor(cached)[:, None] + torch.arange(T)).clamp(max=cache.slots - 1).to(cache.device)
    length = min(max(cached) + T, cache.slots)
    # Prompts from position 0 are plain causal, which SDPA runs faster without a mask.
    mask = causal_mask(positions, length) if any(cached) else None
    if len(requests) == 1 and rows is None:
        kv = cache.sequence_step(positions[0], length)
    else:
        kv = cache.step(positions, length, rows)
    logits = model(ids.to(cache.device), positions, mask=mask, kv=kv, logits_at=keep.to(cache.device))
    return score_prompts(requests, keep.sum(1).tolist(), logits)


def score_prompts(requests: list[Request], kept: list[int], logits: Tensor) -> Tensor:
    """Hand each request that scores its prompt the logits of its prompt positions (``kept`` rows of
    ``logits`` each, in order); the logits [n, vocab] at each one's end."""
    if not any(r.scores_prompt for r in requests):
        return logits
    ends = torch.tensor(kept).cumsum(0) - 1
    for r, end, n in zip(requests, ends.tolist(), kept):
        if r.scores_prompt:
            r.logprobs.add_prompt(logits[end + 1 - n: end], r.prompt_ids)
    return logits[ends.to(logits.device)]


def decode_step(model: Llama, cache: KVCache, tokens: list[int], positions: list[int],
                forward: Callable[..., Tensor] | None = None) -> Tensor:
    """Feed one token per row of ``cache``'s first rows, each at its own position; logits [n, vocab].
    ``forward``: the model compiled (``compile_decoding``), which attends over the whole cache so
    that its shapes stay fixed."""
    ids = torch.tensor(tokens, device=cache.device)[:, None]
    pos = torch.tensor(positions, device=cache.device)[:, None]
    length = cache.slots if forward is not None else max(positions) + 1
    kv = cache.sequence_step(pos[0], length) if len(tokens) == 1 else cache.step(pos, length)
    step = model if forward is None else forward
    return step(ids, pos, mask=causal_mask(pos, length), kv=kv)[:, 0]
def compile_decoding(model: Llama) -> Callable[..., Tensor]:
    """The model's forward through torch.compile, for decoding steps (prompts run eagerly).

    Compiled with fixed shapes: one compilation (about a minute on 2 CPU cores) per batch size
    and cache size, hence the cache sizes rounded to powers of two (``cache_size_for``). On CUDA
    each step is replayed as a CUDA graph ("reduce-overhead"): at batch 1 a 7B step is a few
    milliseconds of kernels that Python would otherwise launch one by one; the KV cache it writes
    is marked static (``KVCache``), so the graph writes it in place.
    """
    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")  # inductor on int4 models
    cuda = model.norm.weight.is_cuda
    return torch.compile(model, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None)


def cache_size_for(tokens: int, max_seq_len: int, compiled: bool) -> int:
    """KV-cache slots for ``tokens``; for compiled decoding, which attends over all of them, the
    next power of two from 256, so that few sizes (compilations) ever occur."""
    if compiled:
        tokens = max(256, 1 << (tokens - 1).bit_length())
    return min(tokens, max_seq_len)


def generate(model: Llama, requests: list[Request],
             forward: Callable[..., Tensor] | None = None) -> Iterator[tuple[int, str]]:
    """Run requests together to the end in a KV cache of their own,
    yielding (request index, new text) as text appears. ``forward``: a compiled decoding step
    (``compile_decoding``)."""
    longest = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
    cache = KVCache(model, len(requests), cache_size_for(longest, model.config.max_seq_len, forward is not None))
    yield from complete(model, cache, requests, forward)


def complete(model: Llama, cache: KVCache, requests: list[Request], forward: Callable[..., Tensor] | None = None,
             cached: list[int] | None = None) -> Iterator[tuple[int, str]]:
    """``generate`` in ``cache`` as it stands, whose first rows must have room for the requests;
    ``cached``: how many prompt tokens each row already holds (see ``prefill``).

    Finished rows stay in the batch (fed their last token) so that the cache is sliced, never
    gathered; their outputs are ignored.
    """
    max_seq_len = model.config.max_seq_len
    with torch.inference_mode():
        logits = prefill(model, cache, requests, cached=cached)
        while True:
            for i, r in enumerate(requests):
                if r.finish_reason is None:
                    text = r.step(logits[i], max_seq_len)
                    if text:
                        yield i, text
            if all(r.finish_reason for r in requests):
                return
            tokens = [r.output_ids[-1] if r.output_ids else r.prompt_ids[-1] for r in requests]
            logits = decode_step(model, cache, tokens, [r.position for r in requests], forward)


# -- speculative decoding ---------------------------------------------------------------------------------
# Decoding reads every weight once per token; a target model can instead check k guessed tokens in one
# forward pass (k + 1 positions), keeping each by the rejection rule (``Request.next_token`` with a
# draft), so the output is distributed as plain sampling's and greedy output is plain greedy output.


def extend(model: Llama, cache: KVCache, tokens: list[int], start: int, row: int = 0) -> Tensor:
    """Feed one sequence's ``tokens`` into ``row`` of ``cache`` from position ``start``; logits [T, vocab].
    What the row held past ``start`` (rejected draft tokens) is overwritten, and masked until it is."""
    positions = torch.arange(start, start + len(tokens), device=cache.device)[None]
    length = start + len(tokens)
    ids = torch.tensor([tokens], device=cache.device)
    if row == 0:
        kv = cache.sequence_step(positions[0], length)
    else:
        kv = cache.step(positions, length, torch.tensor([row], device=cache.device))
    return model(ids, positions, mask=causal_mask(positions, length), kv=kv)[0]


@dataclass
class Speculation:
    """How a single stream speculates (``LLM.load``, ``llamita generate/chat``)."""

    draft: str | None = option(None, "speculative decoding: a smaller model with the same tokenizer proposes tokens, "
                                     "or 'self-int4': the model's own weights in 4 bits")
    draft_tokens: int = option(4, "tokens the draft proposes per pass of the model (--draft, --lookup)")
    lookup: int | None = option(None, "prompt-lookup decoding: the draft is what followed the last N (N..1) tokens' "
                                      "latest earlier occurrence in the prompt and output")

    def __post_init__(self) -> None:
        if self.draft is not None and self.lookup is not None:
            raise LlamitaError("--draft and --lookup are two kinds of draft: give one")
        if self.draft_tokens < 1:
            raise LlamitaError("draft_tokens must be at least 1")
        if self.lookup is not None and self.lookup < 1:
            raise LlamitaError("lookup (the n-gram size) must be at least 1")

    @property
    def on(self) -> bool:
        return self.draft is not None or self.lookup is not None


@dataclass
class SpeculationStats:
    """What speculation gained: tokens drafted and kept, target passes, tokens they produced."""

    drafted: int = 0
    accepted: int = 0
    passes: int = 0  # verification passes of the target (the prompt's pass not counted)
    tokens: int = 0  # tokens those passes produced (kept drafts, replacements, bonus tokens; stops included)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    def line(self) -> str:
        return (f"speculation: {self.accepted}/{self.drafted} drafted tokens accepted ({self.acceptance:.0%}), "
                f"{self.tokens_per_pass:.2f} tokens per target pass ({self.passes} passes)")


class Drafter(Protocol):
    def propose(self, request: Request, k: int) -> tuple[list[int], Tensor | None]:
        """Up to ``k`` tokens to follow ``request``'s prompt and output, and the distributions [n, vocab]
        they were drawn from (None: proposed for certain)."""


class LookupDrafter:
    """Prompt-lookup decoding (Saxena 2023; llama.cpp's and transformers' prompt lookup): the tokens that
    followed the latest earlier occurrence of the text's last ``n`` tokens (then n - 1, ... 1). Free to
    compute, and right wherever the output copies its prompt: summaries, edits, code."""

    def __init__(self, n: int):
        self.n = n

    def propose(self, request: Request, k: int) -> tuple[list[int], Tensor | None]:
        ids = request.prompt_ids + request.output_ids
        for n in range(min(self.n, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start: start + n] == tail:
                    return ids[start + n: start + n + k], None
        return [], None


class ModelDrafter:
    """A draft model in a KV cache of its own, which holds (``held``) the tokens fed so far: each round it
    is fed what the text gained since (rejected tokens fall out by the common prefix; their slots are
    overwritten), then proposes k tokens one at a time, sampled with the request's own settings."""

    def __init__(self, model: Llama):
        self.model = model
        self.cache: KVCache | None = None

    def propose(self, request: Request, k: int) -> tuple[list[int], Tensor | None]:
        ids = request.prompt_ids + request.output_ids
        # The target's context may be longer than the draft's own: its cache follows the target's.
        size = cache_size_for(len(ids) + k, max(self.model.config.max_seq_len, len(ids) + k), compiled=True)
        if self.cache is None or self.cache.slots < size:
            self.cache = KVCache(self.model, 1, size)
        held = min(common_prefix(self.cache.held[0], ids), len(ids) - 1)
        self.cache.held[0] = []  # unknown until the proposal is done
        logits = extend(self.model, self.cache, ids[held:], held)[-1]
        seen = None if request.seen is None else request.seen.clone()
        tokens, qs = [], []
        for i in range(k):
            q = distribution(logits.cpu(), request.params, seen)
            token = int(q.argmax()) if request.params.temperature < GREEDY_BELOW else \
                int(torch.multinomial(q, 1, generator=request.generator))
            tokens.append(token)
            qs.append(q)
            if seen is not None and token < seen.shape[0]:
                seen[token] = True
            if i + 1 < k:
                logits = extend(self.model, self.cache, [token], len(ids) + i)[-1]
        self.cache.held[0] = ids + tokens[:-1]
        return tokens, torch.stack(qs)


def self_int4(model: Llama) -> Llama:
    """The model's own weights quantized to int4, a draft that agrees with it almost always and reads a
    quarter of the bytes (an eighth of float32's); the model itself is unchanged."""
    from llamita.quantize import quantize

    if not any(isinstance(m, torch.nn.Linear) for m in model.layers.modules()):
        raise LlamitaError("--draft self-int4 needs a float model (its layers are quantized already): "
                           "load it with --quantize none")
    return quantize(copy.deepcopy(model), "int4")


def speculate(model: Llama, cache: KVCache, request: Request, drafter: Drafter, k: int,
              stats: SpeculationStats | None = None, cached: int = 0) -> Iterator[str]:
    """``complete`` for one request in row 0 of ``cache``, ``k`` drafted tokens checked per target pass;
    yields new text. Kept tokens go through ``Request.accept`` one by one, so EOS, stop strings and
    limits end the text exactly where plain decoding would; the cache needs no roll-back: the next pass
    writes from the first position that was not kept, and the mask hides anything beyond it."""
    stats = stats if stats is not None else SpeculationStats()
    with torch.inference_mode():
        text = request.step(prefill(model, cache, [request], cached=[cached])[0], model.config.max_seq_len)
        if text:
            yield text
        while request.finish_reason is None:
            yield from speculation_round(model, cache, request, drafter, k, stats)


def speculation_round(model: Llama, cache: KVCache, request: Request, drafter: Drafter, k: int,
                      stats: SpeculationStats, row: int = 0, max_seq_len: int | None = None) -> Iterator[str]:
    """One pass of the target over the request's last token and up to ``k`` drafted ones (in ``row`` of
    ``cache``), each kept or replaced by the rejection rule, in order, until one is replaced (the
    pass's last logits give a bonus token when all are kept); yields the new text."""
    max_seq_len = max_seq_len or model.config.max_seq_len
    start = request.position
    room = min(k, request.params.max_new_tokens - len(request.output_ids) - 1, cache.slots - 1 - start)
    drafts, qs = drafter.propose(request, room) if room > 0 else ([], None)
    logits = extend(model, cache, [request.output_ids[-1], *drafts], start, row)
    stats.passes += 1
    stats.drafted += len(drafts)
    for i in range(len(drafts) + 1):
        draft = drafts[i] if i < len(drafts) else None  # past the drafts: the bonus token
        token = request.next_token(logits[i], draft, None if qs is None or draft is None else qs[i])
        stats.accepted += token == draft
        stats.tokens += 1
        text = request.accept(token, max_seq_len)
        if text:
            yield text
        if request.finish_reason is not None or token != draft:
            break
