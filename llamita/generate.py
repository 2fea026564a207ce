"""Prefill and decode with the KV cache, for one request or many at once; the LLM class.

A ``Request`` holds everything one generation needs (prompt, sampling, stop rules, the text
emitted so far). ``prefill`` and ``decode_step`` run the model for a set of requests, each in its
own KV-cache row at its own position; ``complete`` drives them to the end in the cache as it is,
``generate`` in a cache of its own. The server's engine drives the same pieces for requests that
come and go.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from llamita.chat import Message, encode_chat, stop_token_ids
from llamita.errors import LlamitaError
from llamita.formats import load_model
from llamita.model import KVCache, Llama
from llamita.sampling import SamplingParams, sample
from llamita.tokenizer import StreamDecoder, Tokenizer, load_tokenizer


class StopMatcher:
    """Finds stop strings in streamed text, also when one is split across tokens.

    Text that could still be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Request:
    """One generation: its prompt, how it samples, and what it has produced so far."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    tokenizer: Tokenizer
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, end of turn or stop string) or "length"

    def __post_init__(self) -> None:
        self.generator = self.params.generator()
        self.decoder = StreamDecoder(self.tokenizer)
        self.matcher = StopMatcher(self.params.stop)
        self.seen: Tensor | None = None  # tokens present so far, for the repetition penalty

    @property
    def position(self) -> int:
        """Where the next token fed to the model stands."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def next_token(self, logits: Tensor) -> int:
        if self.params.repetition_penalty != 1.0 and self.seen is None:
            # Sized by the model's vocabulary, which may exceed the tokenizer's (padded embeddings).
            self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            self.seen[torch.tensor(self.prompt_ids + self.output_ids, dtype=torch.long)] = True
        return sample(logits.cpu(), self.params, self.generator, self.seen)

    def accept(self, token: int, max_seq_len: int) -> str:
        """Take a sampled token; return the new text (possibly empty) and set finish_reason when done."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.decoder.flush() + self.matcher.flush()
        self.output_ids.append(token)
        if self.seen is not None and token < self.seen.shape[0]:
            self.seen[token] = True
        text, stopped = self.matcher.push(self.decoder.push(token))
        if stopped:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_new_tokens or self.position + 1 >= max_seq_len:
            self.finish_reason = "length"
            tail, stopped = self.matcher.push(self.decoder.flush())
            text += tail if stopped else tail + self.matcher.flush()
            if stopped:
                self.finish_reason = "stop"
        return text


def prefill(model: Llama, requests: list[Request], rows: Tensor | None = None,
            cached: list[int] | None = None) -> Tensor:
    """Run the prompts (right-padded together) into the cache; logits [n, vocab] at each one's end.

    ``cached``: per request, how many of its first prompt tokens its cache row already holds (a
    prefix it shares with an earlier request there): only the rest is run, from that position.
    """
    device = model.embed_tokens.weight.device
    cached = cached or [0] * len(requests)
    rests = [r.prompt_ids[n:] for r, n in zip(requests, cached)]
    ids = torch.zeros(len(requests), max(map(len, rests)), dtype=torch.long)
    for i, rest in enumerate(rests):
        ids[i, : len(rest)] = torch.tensor(rest)
    positions = torch.arange(ids.shape[1])
    if any(cached):  # padding past the cache's end writes (to be overwritten) in its last slot
        positions = (torch.tensor(cached)[:, None] + positions).clamp(max=model.cache_size - 1)
    last = torch.tensor([len(rest) - 1 for rest in rests], device=device)
    logits = model(ids.to(device), positions.to(device), logits_at=last, cache_rows=rows)
    return logits[:, 0]


def decode_step(model: Llama, tokens: list[int], positions: list[int], rows: Tensor | None = None,
                forward: Callable[..., Tensor] | None = None) -> Tensor:
    """Feed one token per row at its own position; logits [n, vocab]. ``forward``: the model
    compiled (``compile_decoding``), for the cache's full length."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor(tokens, device=device)[:, None]
    pos = torch.tensor(positions, device=device)[:, None]
    return (model if forward is None else forward)(ids, pos, cache_rows=rows)[:, 0]


def compile_decoding(model: Llama) -> Callable[..., Tensor]:
    """The model's forward through torch.compile, for decoding steps (prompts run eagerly).

    Compiled with fixed shapes: one compilation (about a minute on 2 CPU cores) per batch size
    and cache size, hence the cache sizes rounded to powers of two (``cache_size_for``).
    """
    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")  # inductor on int4 models
    return torch.compile(model, fullgraph=True, dynamic=False)


def cache_size_for(tokens: int, max_seq_len: int, compiled: bool) -> int:
    """KV-cache slots for ``tokens``; for compiled decoding, which attends over all of them, the
    next power of two from 256, so that few sizes (compilations) ever occur."""
    if compiled:
        tokens = max(256, 1 << (tokens - 1).bit_length())
    return min(tokens, max_seq_len)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from the start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generate(model: Llama, requests: list[Request],
             forward: Callable[..., Tensor] | None = None) -> Iterator[tuple[int, str]]:
    """Run requests together to the end in a KV cache allocated for them (and freed after),
    yielding (request index, new text) as text appears. ``forward``: a compiled decoding step
    (``compile_decoding``)."""
    longest = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
    model.setup_cache(len(requests), cache_size_for(longest, model.config.max_seq_len, forward is not None))
    try:
        yield from complete(model, requests, forward)
    finally:
        model.clear_cache()


def complete(model: Llama, requests: list[Request], forward: Callable[..., Tensor] | None = None,
             cached: list[int] | None = None) -> Iterator[tuple[int, str]]:
    """``generate`` in the model's KV cache as it stands, whose first rows must have room for the
    requests; ``cached``: how many prompt tokens each row already holds (see ``prefill``).

    Finished rows stay in the batch (fed their last token) so that the cache is sliced, never
    gathered; their outputs are ignored.
    """
    max_seq_len = model.config.max_seq_len
    with torch.inference_mode():
        logits = prefill(model, requests, cached=cached)
        while True:
            for i, r in enumerate(requests):
                if r.finish_reason is None:
                    text = r.accept(r.next_token(logits[i]), max_seq_len)
                    if text:
                        yield i, text
            if all(r.finish_reason for r in requests):
                return
            tokens = [r.output_ids[-1] if r.output_ids else r.prompt_ids[-1] for r in requests]
            logits = decode_step(model, tokens, [r.position for r in requests], forward=forward)


class LLM:
    """A model with its tokenizer and chat format: the Python face of ``llamita generate/chat``."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, template: str = "auto", compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.stop_ids = frozenset(stop_token_ids(tokenizer, template))
        self.forward = compile_decoding(model) if compile else None
        self._caches: list[KVCache] | None = None  # _run_one's KV cache (one per layer), kept between calls
        self._held: list[int] = []  # the tokens whose keys and values it holds

    @classmethod
    def load(cls, source: str | Path | None = None, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu", quantize: str | None = None, template: str = "auto",
             adapter: str | Path | None = None, compile: bool = False) -> "LLM":
        """``quantize="int4"``: 4-bit weight-only linear layers (``quantize_int4``), the fast
        path for decoding on CPU, quantized from the checkpoint's own dtype (float32 for a
        quantized GGUF, whose Q4_1 codes then come back exactly). ``quantize="float16"``: float16
        weights computed in float32 (``quantize_float16``, CPU), the fast path for batches and
        for serving. ``compile``: decoding steps through torch.compile (``compile_decoding``): a
        minute's wait on first use, then the fastest decoding (docs/speed.md)."""
        if quantize not in (None, "int4", "float16"):
            raise LlamitaError(f"unknown quantization {quantize!r} (known: int4, float16)")
        if compile and quantize == "float16":
            raise LlamitaError("--compile cannot trace float16 layers (fbgemm's packed weights): drop --compile, "
                               "or use --quantize int4")
        model = load_model(source, dtype=dtype, device=device)
        if adapter is not None:  # folded into the weights: decoding runs at the base model's speed
            from llamita.lora import load_adapter

            load_adapter(model, adapter, merge=True)
        if quantize:
            from llamita.quantize import quantize_float16, quantize_int4

            {"int4": quantize_int4, "float16": quantize_float16}[quantize](model)
        return cls(model, load_tokenizer(source), template, compile)

    # -- requests ------------------------------------------------------------------------------
    def request(self, prompt_ids: list[int], *, truncate: bool = False, **options) -> Request:
        """A Request for ``prompt_ids``; options are SamplingParams fields."""
        params = SamplingParams(**options)
        limit = self.model.config.max_seq_len - 1  # room for at least one new token
        if len(prompt_ids) > limit:
            if not truncate:
                raise LlamitaError(
                    f"prompt has {len(prompt_ids)} tokens; the context window is {self.model.config.max_seq_len} "
                    "(pass truncate=True / --truncate to keep its end)")
            prompt_ids = prompt_ids[-limit:]
        if not prompt_ids:
            raise LlamitaError("empty prompt: give some text (or a model that adds BOS)")
        return Request(prompt_ids, params, self.stop_ids, self.tokenizer)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return encode_chat(self.tokenizer, messages, self.template)

    # -- text in, text out -----------------------------------------------------------------------
    def stream(self, prompt: str, **options) -> Iterator[str]:
        """The continuation of ``prompt``, chunk by chunk as it is generated."""
        yield from self._run_one(self.request(self.encode(prompt), **options))

    def generate(self, prompt: str, **options) -> str:
        return "".join(self.stream(prompt, **options))

    def stream_chat(self, messages: list[Message], **options) -> Iterator[str]:
        """The assistant's reply to ``messages`` ({"role", "content"} dicts), chunk by chunk."""
        yield from self._run_one(self.request(self.encode_chat(messages), **options))

    def chat(self, messages: list[Message], **options) -> str:
        return "".join(self.stream_chat(messages, **options))

    def generate_batch(self, prompts: list[str], **options) -> list[str]:
        """Continuations of several prompts of any lengths, decoded together in one batch."""
        return self._run_batch([self.request(self.encode(p), **options) for p in prompts])

    def chat_batch(self, conversations: list[list[Message]], **options) -> list[str]:
        return self._run_batch([self.request(self.encode_chat(m), **options) for m in conversations])

    def _run_one(self, request: Request) -> Iterator[str]:
        """One request in a KV cache that this LLM keeps from call to call (the model holds it only
        during the call): a prompt that starts like the last one's prompt and reply, a chat's next
        turn, runs only its new tokens. The cache is sized in powers of two (``cache_size_for``),
        so it is rarely outgrown and set up again."""
        model, need = self.model, len(request.prompt_ids) + request.params.max_new_tokens
        size = cache_size_for(need, model.config.max_seq_len, compiled=True)
        if self._caches is None or self._caches[0].k.shape[2] < size:
            model.setup_cache(1, size)
            self._caches, self._held = [layer.self_attn.kv_cache for layer in model.layers], []
        for layer, cache in zip(model.layers, self._caches):
            layer.self_attn.kv_cache = cache
        cached = min(common_prefix(request.prompt_ids, self._held), len(request.prompt_ids) - 1)
        self._held = []  # unknown until this request is done
        try:
            yield from (text for _, text in complete(model, [request], self.forward, cached=[cached]))
            self._held = request.prompt_ids + request.output_ids[:-1]  # the last token was sampled, never fed
        finally:
            model.clear_cache()

    def _run_batch(self, requests: list[Request]) -> list[str]:
        if not requests:
            return []
        texts = [""] * len(requests)
        for i, text in generate(self.model, requests, self.forward):
            texts[i] += text
        return texts
