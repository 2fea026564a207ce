"""One client must not hurt the others: hostile or broken requests next to ordinary ones ("victims").

In process (the app over ``default_llm``, its engine thread running, httpx's ASGI transport), so
the victims' answers compare exactly with ``LLM.generate_batch``. Nothing waits on timing: the
engine's own counts say what ran together, and where time is the point the victims are timed
against themselves alone. Slow clients meet the app under uvicorn, in a thread, on loopback.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest

from helpers import free_port, poll
from llamita.generate import Request
from llamita.sampling import MAX_STOP_CHARS, MAX_STOPS
from llamita.serve.app import create_app, server_config
from llamita.serve.engine import Connections, Engine
from llamita.tokenizer import Tokenizer

VICTIMS = ["Once upon a time", "The capital of France is", "1, 2, 3, 4,"]
VICTIM_TOKENS = 24


@asynccontextmanager
async def serving(llm, **options) -> AsyncIterator[tuple[httpx.AsyncClient, Engine]]:
    """The app over ``llm`` with its engine running, and a client that talks to it in process."""
    app = create_app(llm, **{"max_batch": 8, "max_seq_len": 256, **options})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)  # a 500 is an answer to check
        async with httpx.AsyncClient(transport=transport, base_url="http://llamita", timeout=300) as client:
            yield client, app.state.engine


def run(llm, scenario: Callable[[httpx.AsyncClient, Engine], Awaitable[Any]], **options) -> Any:
    """``scenario(client, engine)`` against a fresh app, to the end."""
    async def main() -> Any:
        async with serving(llm, **options) as (client, engine):
            return await scenario(client, engine)

    return asyncio.run(main())


def sse_data(text: str) -> list:
    """The data of each server-sent event, JSON-decoded (``[DONE]`` kept as the string)."""
    data = [line.removeprefix("data: ") for line in text.splitlines() if line]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


async def victim(client: httpx.AsyncClient, prompt: str) -> str:
    """A streamed greedy completion; its text, once its stream has ended with ``[DONE]``."""
    body = {"prompt": prompt, "max_tokens": VICTIM_TOKENS, "temperature": 0, "stream": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    events = sse_data(r.text)
    assert events[-1] == "[DONE]", events[-1]
    return "".join(e["choices"][0]["text"] for e in events[:-1])


def victims(client: httpx.AsyncClient) -> list[Awaitable[str]]:
    return [victim(client, p) for p in VICTIMS]


@pytest.fixture(scope="module")
def alone(default_llm) -> list[str]:
    """The victims' texts with nobody else around."""
    return default_llm.generate_batch(VICTIMS, temperature=0, max_new_tokens=VICTIM_TOKENS)


# -- 1. one request fails the whole batch ----------------------------------------------------------
@pytest.mark.slow
def test_tiny_temperatures_sample_greedily_beside_victims(default_llm, alone):
    """1e-45 divided the logits to inf and NaN, and the error failed every request in the batch."""
    async def scenario(client, engine):
        tiny = [client.post("/v1/completions", json={"prompt": VICTIMS[0], "max_tokens": VICTIM_TOKENS,
                                                     "temperature": t}) for t in (1e-45, 1e-40)]
        return await asyncio.gather(*victims(client), *tiny), engine.metrics.outcomes["error"]

    results, errors = run(default_llm, scenario)
    assert results[:len(VICTIMS)] == alone
    for r in results[len(VICTIMS):]:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == alone[0]  # greedy
    assert errors == 0


FAILING_SEED = 666


@pytest.mark.slow
def test_a_failing_request_fails_alone(default_llm, alone, monkeypatch):
    """A request whose sampling raises (here on purpose, at its fourth token) fails alone: a 500, or
    an error event and no ``[DONE]`` when streamed; the victims decoding beside it finish."""
    running_at_failure: list[int] = []
    engine_of: list[Engine] = []
    step = Request.step

    def failing_step(self: Request, logits, max_seq_len: int) -> str:
        if self.params.seed == FAILING_SEED and len(self.output_ids) == 3:
            running_at_failure.append(engine_of[0].running)
            raise RuntimeError("injected failure")
        return step(self, logits, max_seq_len)

    monkeypatch.setattr(Request, "step", failing_step)
    hostile = {"prompt": VICTIMS[1], "max_tokens": VICTIM_TOKENS, "seed": FAILING_SEED}

    async def scenario(client, engine):
        engine_of.append(engine)
        whole = client.post("/v1/completions", json=hostile)
        streamed = client.post("/v1/completions", json={**hostile, "stream": True})
        return await asyncio.gather(*victims(client), whole, streamed), engine.metrics.outcomes["error"]

    results, errors = run(default_llm, scenario)
    assert results[:len(VICTIMS)] == alone
    whole, streamed = results[len(VICTIMS):]
    assert whole.status_code == 500 and "injected failure" in whole.json()["error"]["message"]
    events = sse_data(streamed.text)
    assert "injected failure" in events[-1]["error"]["message"] and "[DONE]" not in events
    assert errors == 2
    assert max(running_at_failure) > len(VICTIMS)  # the victims were in the batch when it failed


# -- 2. long stop strings stall everyone ----------------------------------------------------------
@pytest.mark.slow
def test_longest_stop_strings_beside_victims(default_llm, alone):
    """As many stops as allowed, as long as allowed, with n=4: every answer as greedy gives it alone
    (the per-token cost of the stops is tested in test_generate)."""
    stops = ["x" * (MAX_STOP_CHARS - 1) + str(i) for i in range(MAX_STOPS)]
    hostile = {"prompt": VICTIMS[2], "max_tokens": VICTIM_TOKENS, "temperature": 0, "n": 4, "stop": stops}

    async def scenario(client, engine):
        return await asyncio.gather(*victims(client), client.post("/v1/completions", json=hostile))

    *texts, answer = run(default_llm, scenario)
    assert texts == alone
    assert answer.status_code == 200, answer.text[:200]
    assert [c["text"] for c in answer.json()["choices"]] == [alone[2]] * 4


# -- 3. big messages freeze other streams ----------------------------------------------------------
JSON = {"content-type": "application/json"}


@pytest.mark.slow  # victims three times over, beside 12 requests of 900 KB
def test_big_messages_are_refused_without_holding_the_event_loop(default_llm, alone, monkeypatch):
    """Three clients looping 900 KB messages, next to the victims: the messages are refused by their
    length before any tokenizing, no tokenizing runs on the event loop's thread, and the victims take
    little longer than alone (the messages were tokenized on the event loop, which froze every stream)."""
    tokenized: list[tuple[bool, int]] = []  # (on the event loop's thread, characters) of each text tokenized
    loop_thread: list[int] = []
    encode = Tokenizer.encode

    def recording(self: Tokenizer, text: str, *args, **kwargs) -> list[int]:
        tokenized.append((threading.get_ident() in loop_thread, len(text)))
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", recording)
    big = json.dumps({"messages": [{"role": "user", "content": "hello " * 150_000}]}).encode()

    async def hostile(client: httpx.AsyncClient) -> list[str | None]:
        codes = []
        for _ in range(4):
            r = await client.post("/v1/chat/completions", content=big, headers=JSON)
            codes.append(r.json()["error"]["code"])
        return codes

    async def timed(work: list[Awaitable[Any]]) -> tuple[list[Any], float]:
        start = time.perf_counter()
        results = await asyncio.gather(*work)
        return results, time.perf_counter() - start

    async def scenario(client, engine):
        loop_thread.append(threading.get_ident())
        await asyncio.gather(*victims(client))  # warm: the same prompts, cached alike in both runs below
        by_themselves = await timed(victims(client))
        beside_hostile = await timed([*victims(client), *(hostile(client) for _ in range(3))])
        return by_themselves, beside_hostile

    (texts_alone, time_alone), (results, time_beside) = run(default_llm, scenario)
    assert texts_alone == alone and results[:len(VICTIMS)] == alone
    assert results[len(VICTIMS):] == [["context_length_exceeded"] * 4] * 3
    limit = 256 * default_llm.tokenizer.longest_token_chars  # the app's window, 256 tokens
    assert tokenized and not any(on_loop for on_loop, _ in tokenized)
    assert max(chars for _, chars in tokenized) <= limit
    assert time_beside < 3 * time_alone, (time_beside, time_alone)


# -- 4. unpaired surrogates ------------------------------------------------------------------------
def refused(client: httpx.AsyncClient, path: str, body: dict) -> Awaitable[httpx.Response]:
    """``body`` sent as JSON with non-ASCII escaped, as ``"\\ud800"`` must be (it is no UTF-8)."""
    return client.post(path, content=json.dumps(body), headers=JSON)


LONE = "caf\ud800"  # valid JSON once escaped, not Unicode

# -- bad input, refused before the engine ----------------------------------------------------------
BAD = [  # (path, body, param)
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e-300}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 1e300}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a"] * (MAX_STOPS + 1)}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a" * (MAX_STOP_CHARS + 1)]}, "stop.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": "a" * (MAX_STOP_CHARS + 1)},
     "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
     "messages.0.content.0.text"),
    ("/v1/completions", {"prompt": LONE}, "prompt"),
    ("/v1/completions", {"prompt": ["hi", LONE]}, "prompt.1"),
    ("/predict", {"text": LONE}, "text"),
]


@pytest.mark.slow
def test_bad_input_is_refused_and_victims_finish(default_llm, alone):
    async def scenario(client, engine):
        return await asyncio.gather(*victims(client), *(refused(client, path, body) for path, body, _ in BAD))

    results = run(default_llm, scenario)
    assert results[:len(VICTIMS)] == alone
    for r, (path, body, param) in zip(results[len(VICTIMS):], BAD):
        assert r.status_code == 400, (path, param, r.text[:200])
        assert r.json()["error"]["param"] == param
        if LONE in json.dumps(body, ensure_ascii=False):
            assert "unpaired surrogate (U+D800)" in r.json()["error"]["message"]


# -- 5. slow clients ---------------------------------------------------------------------------------
@contextmanager
def uvicorn_serving(llm, limits: Connections) -> Iterator[str]:
    """The app under uvicorn as ``llamita serve`` configures it, in a thread; its base URL."""
    import uvicorn

    port = free_port()
    app = create_app(llm, max_batch=2, max_seq_len=256)
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        poll(lambda: server.started, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def until_closed(sockets: list[socket.socket], trickle: bytes = b"") -> list[socket.socket]:
    """Sends each socket ``trickle`` every round (a tenth of a second at most) until the server has
    closed them all, or 300 rounds have passed; the sockets still open."""
    left = list(sockets)
    for _ in range(300):
        for s in list(left):
            try:
                s.sendall(trickle)
            except OSError:
                left.remove(s)
        if not left:
            break
        readable, _, _ = select.select(left, [], [], 0.1)
        for s in readable:
            try:
                gone = s.recv(4096) == b""
            except OSError:
                gone = True
            if gone:
                left.remove(s)
        if not left:
            break
    for s in sockets:
        if s not in left:
            s.close()
    return left


@pytest.mark.slow  # a server on loopback, and its deadlines to run out
def test_slow_clients_are_cut_off_and_the_others_served(default_llm):
    """Connections trickling their headers were held forever; now they are closed at the header
    deadline, idle kept-alive ones at the idle timeout, and past the cap a request gets a 503."""
    limits = Connections(header_timeout=2.0, idle_timeout=1.0, max_connections=12)
    expected = default_llm.generate(VICTIMS[0], temperature=0, max_new_tokens=4)
    body = {"prompt": VICTIMS[0], "max_tokens": 4, "temperature": 0}
    with uvicorn_serving(default_llm, limits) as url:
        port = int(url.rsplit(":", 1)[1])

        def connect(n: int) -> list[socket.socket]:
            return [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]

        slow = connect(10)
        for s in slow:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: llamita\r\nX-Slow: ")
        with httpx.Client(timeout=300) as client:  # beside them, two requests on one kept-alive connection
            for _ in range(2):
                r = client.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
        assert until_closed(slow, trickle=b"x") == []

        silent = connect(limits.max_connections)  # the cap reached by connections that say nothing
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=300).status_code == 503
        assert until_closed(silent) == []
        assert httpx.get(f"{url}/health").status_code == 200

        idle = connect(1)
        idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: llamita\r\n\r\n")
        assert until_closed(idle) == []  # answered, then closed once idle
