"""Continuous batching: many requests share one model and one pool of KV-cache rows.

One background thread owns the model. Each turn of its loop admits waiting requests into free
cache rows (one prefill for all of them), then runs a single ``decode_step`` for every running
request at once, each at its own position. A row keeps what its last request left in the cache,
so a request that starts the same way (a chat's next turn) goes to that row and runs only the
rest of its prompt; a start held by a row that is busy (a system prompt shared by all clients) is
copied into a free row instead of computed again (unless the request scores its prompt, ``echo``
with ``logprobs``, which needs the logits at every position). A request that arrives mid-generation joins the batch
at the next turn; one that finishes or is cancelled frees its row at the next turn. The pieces it
drives are ``generate``'s own (``prefill``, ``decode_step``, ``Request``), over a ``KVCache`` it
owns: the engine only schedules.

Results travel to the asyncio side through each stream's queue (``call_soon_threadsafe``), so the
HTTP handlers never block on the model.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from llamita.cache import KVCache, common_prefix
from llamita.errors import LlamitaError
from llamita.generate import Drafter, Request, SpeculationStats, decode_step, prefill, speculation_round
from llamita.model import Llama
from llamita.options import option
from llamita.parallel import TensorParallel


class QueueFull(Exception):
    """More requests are waiting than ``max_queue``: the caller should answer 429."""


class EngineStopped(Exception):
    """The engine is shutting down (or its thread died): the caller should answer 503."""


@dataclass(frozen=True)
class Event:
    """New text for one choice of a stream; ``finish`` is set on its last event."""

    index: int
    text: str
    finish: str | None = None  # "stop", "length", "abort" (the server shut down) or "error" (it failed)


class Stream:
    """The choices of one HTTP request (``n`` of them, or one per prompt), as they are generated.

    Created on the event loop; the engine thread pushes events into it thread-safely.
    """

    def __init__(self, requests: list[Request]):
        self.requests = requests
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.created = time.perf_counter()

    def push(self, event: Event) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        """The client went away: the engine drops this stream's requests at its next turn."""
        self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        """Events until every choice has finished."""
        running = len(self.requests)
        while running:
            event = await self.queue.get()
            running -= event.finish is not None
            yield event


@dataclass
class Job:
    """One request of a stream, waiting or in a cache row."""

    stream: Stream
    index: int

    @property
    def request(self) -> Request:
        return self.stream.requests[self.index]


WORTH_WAITING = 64  # tokens a request must share with one prefilled this turn to wait a turn and copy them
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    """The engine's own counts, for /metrics and for tests that must not rely on timing."""

    decode_steps: int = 0  # decoding forward passes (one per turn, whatever the batch size)
    prefills: int = 0  # prefill forward passes (one per turn that admitted requests)
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0  # of those, already in the request's cache row: not run again
    prompt_tokens_copied: int = 0  # of those, copied there from another row (a prefix shared across rows)
    generated_tokens: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # stop/length/cancelled/...
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def observe_ttft(self, seconds: float) -> None:
        i = bisect.bisect_left(TTFT_BUCKETS, seconds)
        if i < len(TTFT_BUCKETS):
            self.ttft_buckets[i] += 1
        self.ttft_sum += seconds
        self.ttft_count += 1


@dataclass
class EngineConfig:
    """How the engine schedules; ``llamita serve``'s flags are made from these fields."""

    max_batch: int = option(16, "requests decoded together (KV-cache rows)")
    max_queue: int = option(64, "waiting requests before answering 429")
    max_seq_len: int = option(2048, "context per row: prompt plus new tokens")
    max_prefill_tokens: int = option(256, "prompt tokens (padded) prefilled in one pass: a burst of prompts is spread "
                                          "over passes this size, so the first start sooner")

    def __post_init__(self) -> None:
        for name, least in [("max_batch", 1), ("max_queue", 0), ("max_seq_len", 2), ("max_prefill_tokens", 1)]:
            if getattr(self, name) < least:
                raise LlamitaError(f"{name} must be at least {least}, not {getattr(self, name)}")


@dataclass(frozen=True)
class Connections:
    """The HTTP server's limits on connections (``llamita serve``'s flags too): uvicorn, left to
    itself, holds a connection whose client trickles its headers forever, and any number of them."""

    header_timeout: float = option(10.0, "seconds a connection has for a request's headers, from its opening or "
                                         "its last response")
    idle_timeout: float = option(5.0, "seconds a kept-alive connection may wait for its next request")
    max_connections: int = option(256, "open connections (or requests in flight) past which requests get a 503")
    shutdown_timeout: float = option(30.0, "seconds running requests get to finish after SIGTERM (new ones get a "
                                           "503); then their streams end, finish reason 'abort'")

    def __post_init__(self) -> None:
        for name in ("header_timeout", "idle_timeout", "max_connections", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                raise LlamitaError(f"{name} must be positive, not {getattr(self, name)}")


class Engine:
    """A fixed pool of ``max_batch`` KV-cache rows of ``max_seq_len`` tokens, and the thread that fills them."""

    def __init__(self, model: Llama, config: EngineConfig | None = None, tp: TensorParallel | None = None,
                 drafter: Drafter | None = None, draft_tokens: int = 4):
        """``tp``: under tensor parallel, rank 0's engine tells the other ranks (``follow``) each pass.
        ``drafter``: a request running alone decodes speculatively, ``draft_tokens`` a pass."""
        config = config or EngineConfig()
        self.model, self.tp = model, tp
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.speculation = SpeculationStats()
        self.max_batch = config.max_batch
        self.max_queue = config.max_queue
        self.max_prefill_tokens = config.max_prefill_tokens
        self.max_seq_len = min(config.max_seq_len, model.config.max_seq_len)
        self.rows: list[Job | None] = [None] * self.max_batch
        self.cache: KVCache | None = None  # the engine thread's, while it runs
        self.waiting: collections.deque[Job] = collections.deque()
        self.metrics = Metrics()
        self._wake = threading.Condition()
        self._stopping = False
        self._draining = False  # no new requests: the server is shutting down
        self._aborting = False  # end every request now
        self._thread: threading.Thread | None = None

    # -- the asyncio side ------------------------------------------------------------------------
    def submit(self, requests: list[Request]) -> Stream:
        """Queue a stream's requests; raises QueueFull past ``max_queue`` waiting requests."""
        stream = Stream(requests)
        with self._wake:
            if self._stopping or self._draining or not self.alive:
                raise EngineStopped("the server is shutting down" if self._draining else "the engine is not running")
            if len(self.waiting) + len(requests) > self.max_queue:
                self.metrics.outcomes["rejected"] += len(requests)
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit is {self.max_queue})")
            self.waiting.extend(Job(stream, i) for i in range(len(requests)))
            self._wake.notify()
        return stream

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def serving(self) -> bool:
        """Running and taking requests (not draining for a shutdown)."""
        return self.alive and not self._draining

    @property
    def running(self) -> int:
        return sum(job is not None for job in self.rows)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llamita-engine", daemon=True)
        self._thread.start()

    def drain(self, timeout: float) -> bool:
        """For a graceful shutdown: refuse new requests, give the running and waiting ones up to
        ``timeout`` seconds to finish, then end the rest (finish reason "abort", their text so far
        kept). Blocks until none is left; True if all finished on their own."""
        def idle() -> bool:
            return not (self.running or self.waiting) or not self.alive

        with self._wake:
            self._draining = True
            if self._wake.wait_for(idle, timeout):
                return True
            self._aborting = True
            self._wake.notify_all()
            self._wake.wait_for(idle, 60)  # the engine ends them at its next turn
            return False

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the model thread ------------------------------------------------------------------------
    def _run(self) -> None:
        self.cache = KVCache(self.model, self.max_batch, self.max_seq_len)
        try:
            with torch.inference_mode():
                while self._next_turn():
                    try:
                        self._admit()
                        if self.running:
                            self._decode()
                    except Exception as e:  # a decoding pass failed: the requests it ran fail, not the server
                        self._fail_all(e)
        finally:
            self.cache = None
            if self.tp:
                self.tp.send(None)  # the other ranks stop following
            self._fail_all(EngineStopped("the engine stopped"), waiting=True)

    # The passes that write the cache, told first to the other ranks under tensor parallel (``follow``).
    def _prefill(self, requests: list[Request], rows: torch.Tensor, cached: list[int]) -> torch.Tensor:
        if self.tp:
            self.tp.send(("prefill", [(r.prompt_ids, r.scores_prompt) for r in requests], rows.tolist(), cached))
        return prefill(self.model, self.cache, requests, rows=rows, cached=cached)

    def _decode_step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        if self.tp:
            self.tp.send(("decode", tokens, positions))
        return decode_step(self.model, self.cache, tokens, positions)

    def _copy_prefix(self, source: int, row: int, n: int) -> None:
        if self.tp:
            self.tp.send(("copy", source, row, n))
        self.cache.copy_prefix(source, row, n)

    def _next_turn(self) -> bool:
        """Drop cancelled requests; sleep while there is nothing to do; False once stopping."""
        with self._wake:
            if self._aborting:
                self._abort_all()
            for row, job in enumerate(self.rows):
                if job is not None and job.stream.cancelled:
                    self._finish(row, "cancelled")
            kept = collections.deque(job for job in self.waiting if not job.stream.cancelled)
            self.metrics.outcomes["cancelled"] += len(self.waiting) - len(kept)
            self.waiting = kept
            while not self._stopping and not self.waiting and not self.running:
                self._wake.wait()
            return not self._stopping

    def _admit(self) -> None:
        """Move waiting requests into free rows and prefill them together. One big prefill is the
        most efficient, but it stalls the running streams, so a turn takes at most
        ``max_prefill_tokens`` (padded) of prompts to run: long ones are spread over a few turns,
        with decode steps between them."""
        admitted: list[tuple[int, Job]] = []
        cached: list[int] = []
        copied = 0
        with self._wake:
            free = [row for row, job in enumerate(self.rows) if job is None]
            busy = [row for row, job in enumerate(self.rows) if job is not None]  # holding their prompts
            longest = 0
            while self.waiting and free:
                request = self.waiting[0].request
                row, n, source = self.cache.reuse(request.prompt_ids, free, not request.scores_prompt, busy)
                if admitted and self._worth_waiting(request, [job for _, job in admitted], n):
                    break
                longest = max(longest, len(request.prompt_ids) - n)
                if admitted and (len(admitted) + 1) * longest > self.max_prefill_tokens:
                    break
                if source is not None:
                    self._copy_prefix(source, row, n)
                    copied += n
                free.remove(row)
                admitted.append((row, self.waiting.popleft()))
                cached.append(n)
            for row, job in admitted:
                self.rows[row] = job
                self.cache.held[row] = []  # being written
        if not admitted:
            return
        requests = [job.request for _, job in admitted]
        rows = torch.tensor([row for row, _ in admitted], device=self.cache.device)
        try:
            logits = self._prefill(requests, rows, cached)
        except Exception as e:  # the requests prefilled together fail; those already decoding go on
            for row, job in admitted:
                self._fail(row, job, e)
            return
        self.metrics.prefills += 1
        self.metrics.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        self.metrics.prompt_tokens_cached += sum(cached)
        self.metrics.prompt_tokens_copied += copied
        for row, job in admitted:  # until it is done, a row holds (at least) its prompt: a source to copy
            self.cache.held[row] = job.request.prompt_ids
        self._sample(admitted, logits)  # the first tokens (on CUDA, once the prefill has really run)
        now = time.perf_counter()
        for _, job in admitted:
            self.metrics.observe_ttft(now - job.stream.created)

    @staticmethod
    def _worth_waiting(request: Request, admitted: list[Job], cached: int) -> bool:
        """Whether ``request`` shares a long start (a system prompt, a few-shot header) with a
        request being prefilled this turn, past what it can reuse now: next turn it copies it."""
        return any(common_prefix(request.prompt_ids, job.request.prompt_ids) - cached >= WORTH_WAITING
                   for job in admitted)

    def _decode(self) -> None:
        """One forward pass for every running request. Rows past the last busy one are left out;
        idle rows below it are fed their own first token at position 0, which leaves their cache
        as it was (slicing the cache beats gathering)."""
        n = max(row for row, job in enumerate(self.rows) if job is not None) + 1
        running = [(row, job) for row, job in enumerate(self.rows[:n]) if job is not None]
        if self.drafter is not None and self.tp is None and len(running) == 1 and not self.waiting:
            self._speculate(*running[0])
            return
        tokens = [held[0] if held else 0 for held in self.cache.held[:n]]
        positions = [0] * n
        for row, job in running:
            tokens[row], positions[row] = job.request.output_ids[-1], job.request.position
        logits = self._decode_step(tokens, positions)
        self.metrics.decode_steps += 1
        self._sample(running, logits[[row for row, _ in running]])

    def _speculate(self, row: int, job: Job) -> None:
        """A request alone: one pass of the model checks the draft's tokens (``speculation_round``);
        a batch decodes a token a row instead, which already reads each weight once for all of them."""
        r, before = job.request, self.speculation.tokens
        try:
            text = "".join(speculation_round(self.model, self.cache, r, self.drafter, self.draft_tokens,
                                             self.speculation, row, self.max_seq_len))
        except Exception as e:
            self._fail(row, job, e)
            return
        self.metrics.decode_steps += 1
        self.metrics.generated_tokens += self.speculation.tokens - before
        if text or r.finish_reason:
            job.stream.push(Event(job.index, text, r.finish_reason))
        if r.finish_reason:
            with self._wake:
                self._finish(row, r.finish_reason)

    def _sample(self, jobs: list[tuple[int, Job]], logits: torch.Tensor) -> None:
        """Each request picks its next token from its row of ``logits``; text goes to its stream.
        A request whose step fails fails alone: the others in the batch go on."""
        logits = logits.float().cpu()
        for i, (row, job) in enumerate(jobs):
            try:
                self._step(row, job, logits[i])
            except Exception as e:
                self._fail(row, job, e)

    def _step(self, row: int, job: Job, logits: torch.Tensor) -> None:
        r = job.request
        text = r.step(logits, self.max_seq_len)
        self.metrics.generated_tokens += not r.prompt_only
        if text or r.finish_reason:
            job.stream.push(Event(job.index, text, r.finish_reason))
        if r.finish_reason:
            with self._wake:
                self._finish(row, r.finish_reason)

    def _finish(self, row: int, outcome: str) -> None:
        # What the row's cache holds now; after an error, nothing.
        if self.cache is not None:
            self.cache.held[row] = [] if outcome == "error" else self.rows[row].request.fed_ids
        self.rows[row] = None
        self.metrics.outcomes[outcome] += 1
        self._wake.notify_all()  # a drain may be waiting for the last one

    def _abort_all(self) -> None:
        """End every request now (a shutdown's time is up): each stream gets what its text held
        back and a last event, "abort"; called with ``_wake`` held."""
        for row, job in enumerate(self.rows):
            if job is not None:
                r = job.request
                job.stream.push(Event(job.index, r.decoder.flush() + r.matcher.flush(), "abort"))
                self._finish(row, "aborted")
        while self.waiting:
            job = self.waiting.popleft()
            job.stream.push(Event(job.index, "", "abort"))
            self.metrics.outcomes["aborted"] += 1
        self._wake.notify_all()

    def _fail(self, row: int, job: Job, error: Exception) -> None:
        """Fail one request: its stream gets the error, its row is freed (its cache forgotten)."""
        with self._wake:
            if self.rows[row] is job:
                self._finish(row, "error")
        job.stream.push(Event(job.index, str(error) or type(error).__name__, "error"))

    def _fail_all(self, error: Exception, waiting: bool = False) -> None:
        """Fail every running request (a forward pass they shared failed), and the waiting ones too
        when the engine stops."""
        with self._wake:
            for row, job in enumerate(self.rows):
                if job is not None:
                    self._fail(row, job, error)
            if waiting:
                while self.waiting:
                    job = self.waiting.popleft()
                    self.metrics.outcomes["error"] += 1
                    job.stream.push(Event(job.index, str(error), "error"))

    # -- /metrics --------------------------------------------------------------------------------
    def prometheus(self) -> str:
        """The counters in Prometheus' text exposition format."""
        m = self.metrics
        lines = [
            "# HELP llamita_requests_total Requests by outcome: stop, length, cancelled (client left), "
            "rejected (queue full), error.",
            "# TYPE llamita_requests_total counter",
            *(f'llamita_requests_total{{outcome="{k}"}} {m.outcomes[k]}'
              for k in ("stop", "length", "cancelled", "rejected", "aborted", "error")),
        ]
        for name, kind, value, doc in [
            ("prompt_tokens_total", "counter", m.prompt_tokens, "Prompt tokens of admitted requests."),
            ("prompt_tokens_cached_total", "counter", m.prompt_tokens_cached,
             "Prompt tokens not computed: a prefix already in the request's KV-cache row (the row's last request's), "
             "or copied there from another row."),
            ("prompt_tokens_copied_total", "counter", m.prompt_tokens_copied,
             "Of the cached prompt tokens, those copied from another row (a prefix shared across requests)."),
            ("prefix_cache_hit_ratio", "gauge", round(m.prompt_tokens_cached / max(m.prompt_tokens, 1), 6),
             "Share of prompt tokens taken from the cache rather than computed."),
            ("generated_tokens_total", "counter", m.generated_tokens, "Tokens sampled."),
            ("decode_steps_total", "counter", m.decode_steps, "Decoding forward passes (one per step, whole batch)."),
            ("prefills_total", "counter", m.prefills, "Prefill forward passes."),
            ("speculative_passes_total", "counter", self.speculation.passes,
             "Decoding passes that checked drafted tokens (a request running alone, with --draft or --lookup)."),
            ("speculative_drafted_tokens_total", "counter", self.speculation.drafted, "Tokens the draft proposed."),
            ("speculative_accepted_tokens_total", "counter", self.speculation.accepted,
             "Drafted tokens the model kept (the rejection rule: the output is as without a draft)."),
            ("speculative_tokens_per_pass", "gauge", round(self.speculation.tokens_per_pass, 6),
             "Tokens each speculative pass produced (kept drafts, and the model's own token after them)."),
            ("queue_length", "gauge", len(self.waiting), "Requests waiting for a cache row."),
            ("running_requests", "gauge", self.running, "Requests in cache rows."),
            ("batch_slots", "gauge", self.max_batch, "KV-cache rows."),
        ]:
            lines += [f"# HELP llamita_{name} {doc}", f"# TYPE llamita_{name} {kind}", f"llamita_{name} {value}"]
        lines += ["# HELP llamita_time_to_first_token_seconds From arrival to the first sampled token.",
                  "# TYPE llamita_time_to_first_token_seconds histogram"]
        cumulative = 0
        for bound, count in zip(TTFT_BUCKETS, m.ttft_buckets):
            cumulative += count
            lines.append(f'llamita_time_to_first_token_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines += [f'llamita_time_to_first_token_seconds_bucket{{le="+Inf"}} {m.ttft_count}',
                  f"llamita_time_to_first_token_seconds_sum {m.ttft_sum:.6f}",
                  f"llamita_time_to_first_token_seconds_count {m.ttft_count}"]
        return "\n".join(lines) + "\n"


class _Prompt:
    """What a prefill reads of a request, on a rank that samples nothing (``follow``)."""

    def __init__(self, prompt_ids: list[int], scores_prompt: bool):
        self.prompt_ids, self.scores_prompt = prompt_ids, scores_prompt
        self.logprobs = self

    def add_prompt(self, *_) -> None:  # rank 0 keeps the prompt's log-probs
        pass


def follow(model: Llama, config: EngineConfig, tp: TensorParallel) -> None:
    """A rank but 0 under ``serve --tp``: run each pass rank 0's engine tells, on this rank's slice of
    the model and of the KV cache, until it stops. Rank 0 answers HTTP and samples; a pass that fails
    here fails there too (the same inputs), where its requests are answered."""
    for stop in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when to stop (a graceful shutdown needs us)
        signal.signal(stop, signal.SIG_IGN)
    cache = KVCache(model, config.max_batch, min(config.max_seq_len, model.config.max_seq_len))
    with torch.inference_mode():
        while (message := tp.receive()) is not None:
            kind, *args = message
            with contextlib.suppress(Exception):
                if kind == "prefill":
                    prompts, rows, cached = args
                    prefill(model, cache, [_Prompt(*p) for p in prompts], rows=torch.tensor(rows, device=cache.device),
                            cached=cached)
                elif kind == "decode":
                    decode_step(model, cache, *args)
                else:
                    cache.copy_prefix(*args)
