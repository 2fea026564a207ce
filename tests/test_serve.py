"""The server end to end: ``llamita serve`` in a subprocess on loopback, driven by the official
openai client and by raw HTTP. Nothing waits on timing: readiness and engine state are polled
(bounded) from /health and /metrics, whose counts come from the engine itself.
"""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx  # a missing test dependency fails the module loudly: no skips
import openai
import pytest

from helpers import poll, running_server

pytestmark = pytest.mark.slow  # every test here talks to a server in a subprocess

MODEL = "smollm2-135m-instruct"
SEQ_LEN = 1024
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding keeps counting: a request that runs until stopped
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server("--max-batch", "16", "--max-queue", "64", "--max-seq-len", str(SEQ_LEN)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def metrics(url: str) -> dict[str, float]:
    """/metrics parsed: ``name{labels}`` -> value."""
    text = httpx.get(f"{url}/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def sse_events(response: httpx.Response) -> list:
    """The data of each server-sent event, JSON-decoded (``[DONE]`` kept as the string)."""
    events = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# -- 1. the official client ----------------------------------------------------------------------
def test_openai_client(client, default_llm):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL

    expected = default_llm.chat(CHAT, temperature=0, max_new_tokens=24)
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(default_llm.encode_chat(CHAT))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1

    # n choices with seeds seed, seed+1: greedy makes them all the same text.
    both = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24, n=2, seed=3)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.message.content for c in both.choices] == [expected, expected]


def test_completions_and_stop_strings(client, default_llm):
    prompt = "Once upon a time"
    expected = default_llm.generate(prompt, temperature=0, max_new_tokens=16)
    done = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert done.object == "text_completion" and done.choices[0].text == expected
    assert done.usage.prompt_tokens == len(default_llm.encode(prompt))

    stop = expected.split()[2]  # a word from the middle of the greedy continuation
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].text == default_llm.generate(prompt, temperature=0, max_new_tokens=16, stop=[stop])
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"

    streamed = list(client.completions.create(model=MODEL, prompt=[prompt, "The capital of Italy is"],
                                              temperature=0, max_tokens=8, stream=True))
    by_index = {0: "", 1: ""}
    for chunk in streamed:
        by_index[chunk.choices[0].index] += chunk.choices[0].text
    assert by_index[0] == default_llm.generate(prompt, temperature=0, max_new_tokens=8)
    assert by_index[1] == default_llm.generate("The capital of Italy is", temperature=0, max_new_tokens=8)


# -- 2. the Llama 2 articles' endpoint -----------------------------------------------------------
def test_predict(server, default_llm):
    r = httpx.post(f"{server}/predict", json={"text": "The capital of Italy is", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    assert r.json() == {"generation": default_llm.generate("The capital of Italy is", temperature=0, max_new_tokens=12)}


# -- 3. many clients at once ---------------------------------------------------------------------
def test_sixteen_concurrent_streams(server, default_llm):
    questions = [f"Tell me one fact about the number {i}." for i in range(16)]
    start = threading.Barrier(16)

    def stream(question: str) -> list:
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0,
                "stream": True}
        start.wait()
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=300) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            return sse_events(r)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, questions))
    # Each row of the batch computes what the request would alone: no cross-talk between rows
    # (LLM.chat_batch equals one-at-a-time chat, as test_generate shows; it is the faster oracle here).
    expected = default_llm.chat_batch([[{"role": "user", "content": q}] for q in questions], temperature=0,
                                      max_new_tokens=16)
    for question, events, text_alone in zip(questions, results, expected):
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        finishes = [c["choices"][0]["finish_reason"] for c in chunks]
        assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == text_alone, question


def test_batching_shares_decode_passes(server):
    """8 requests of 32 new tokens: 256 tokens made in at most a third as many forward passes."""
    before = metrics(server)
    start = threading.Barrier(8)

    def complete(i: int) -> dict:
        start.wait()
        body = {"prompt": f"{COUNTING} {i}", "max_tokens": 32, "temperature": 0}
        return httpx.post(f"{server}/v1/completions", json=body, timeout=300).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(complete, range(8)))
    assert [a["usage"]["completion_tokens"] for a in answers] == [32] * 8
    after = metrics(server)
    made = after["llamita_generated_tokens_total"] - before["llamita_generated_tokens_total"]
    passes = after["llamita_decode_steps_total"] - before["llamita_decode_steps_total"]
    assert made == 256
    assert passes <= 256 / 3, f"{passes} decode passes for 256 tokens"


def test_arrival_joins_the_running_batch(server):
    """A request arriving mid-generation is decoded alongside the running one, not after it."""
    body = {"prompt": COUNTING, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=300) as long:
        lines = long.iter_lines()  # kept: dropping the iterator would close the stream
        assert next(lines).startswith("data: ")
        before = metrics(server)
        short = httpx.post(f"{server}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 16,
                                                              "temperature": 0}, timeout=300).json()
        after = metrics(server)
        assert short["usage"]["completion_tokens"] == 16
        assert after["llamita_running_requests"] == 1  # the long one is still generating...
        passes = after["llamita_decode_steps_total"] - before["llamita_decode_steps_total"]
        made = after["llamita_generated_tokens_total"] - before["llamita_generated_tokens_total"]
        assert passes < made - 8  # ...and shared its decode passes with the short one
    poll(lambda: metrics(server)["llamita_running_requests"] == 0, "the long one to be cancelled")


def test_next_chat_turn_runs_only_its_new_tokens(server, client):
    """A chat's next turn goes to the cache row its previous turn left, runs only the tokens past
    their shared start, and answers as LLM.chat does from scratch. A long request decodes beside it
    in the meantime, so the idle row holding the first turn is fed through decoding steps first
    (with its own first token at position 0, which must leave its cache as it was)."""
    from llamita.llm import LLM

    llm = LLM.load(None)
    first = [{"role": "user", "content": "Name a large animal that lives in the Andes."}]
    url = server
    answer = client.chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=12)
    second = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "And a small one?"}]
    body = {"prompt": COUNTING, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as long:
        lines = long.iter_lines()  # kept: dropping the iterator would close the stream
        assert next(lines).startswith("data: ")
        before = metrics(url)
        reply = client.chat.completions.create(model=MODEL, messages=second, temperature=0, max_tokens=16)
        after = metrics(url)
        assert after["llamita_running_requests"] == 1  # the long one decoded all along
    assert reply.choices[0].message.content == llm.chat(second, temperature=0, max_new_tokens=16)
    cached = after["llamita_prompt_tokens_cached_total"] - before["llamita_prompt_tokens_cached_total"]
    assert len(llm.encode_chat(first)) <= cached < len(llm.encode_chat(second))


def test_metrics_format(server):
    text = httpx.get(f"{server}/metrics").text
    for name, kind in [("requests_total", "counter"), ("generated_tokens_total", "counter"),
                       ("queue_length", "gauge"), ("time_to_first_token_seconds", "histogram")]:
        assert f"# TYPE llamita_{name} {kind}" in text
    m = metrics(server)
    ttft = "llamita_time_to_first_token_seconds"
    assert m[f'{ttft}_bucket{{le="+Inf"}}'] == m[f"{ttft}_count"] > 0
    assert m['llamita_requests_total{outcome="stop"}'] + m['llamita_requests_total{outcome="length"}'] > 0


# -- 4. bad input ---------------------------------------------------------------------------------
OK = [{"role": "user", "content": "hi"}]
BAD = [  # (path, body: dict or raw bytes, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content.0.type"),
    ("/v1/chat/completions", {"messages": OK, "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": OK, "max_tokens": 8.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": OK, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": OK, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": OK, "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": OK, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": OK, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": OK, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": OK, "top_k": 0}, 400, "top_k"),
    ("/v1/chat/completions", {"messages": OK, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": OK, "stop": [""]}, 400, "stop.0"),
    ("/v1/chat/completions", {"messages": OK, "n": 1000}, 400, "n"),
    ("/v1/chat/completions", {"messages": OK, "seed": 2**70}, 400, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 1500}]}, 400, "messages"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hello " * 1500}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": SEQ_LEN}, 400, "max_tokens"),
    ("/predict", {}, 400, "text"),
    ("/predict", {"text": None}, 400, "text"),
]


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_input(server, path, body, status, param):
    raw = isinstance(body, bytes)
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if raw else {"json": body}
    error = assert_error(httpx.post(f"{server}{path}", **kwargs), status, param)
    assert error["type"] == "invalid_request_error"


def test_bad_requests_of_other_kinds_then_a_good_one(server, client):
    big = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    assert_error(httpx.post(f"{server}/v1/completions", content=big), 413)  # Content-Length says so
    chunks = (b"x" * 65536 for _ in range(32))  # no Content-Length: streamed past the limit
    assert_error(httpx.post(f"{server}/v1/completions", content=chunks), 413)
    assert_error(httpx.get(f"{server}/v1/nothing"), 404)
    assert_error(httpx.get(f"{server}/v1/chat/completions"), 405)
    assert_error(httpx.get(f"{server}/v1/models/gpt-4"), 404, "model")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["param"] == "messages.0.role"
    # ... and the server still answers.
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=4)
    assert reply.choices[0].message.content


# -- 5. clients that leave -----------------------------------------------------------------------
def test_disconnected_stream_stops_its_generation(server):
    before = metrics(server)
    body = {"prompt": COUNTING, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=300) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # it is generating
    # The connection is closed; the engine drops the request at its next step.
    poll(lambda: metrics(server)['llamita_requests_total{outcome="cancelled"}'] > before[
        'llamita_requests_total{outcome="cancelled"}'], "the cancellation")
    after = metrics(server)
    assert after["llamita_running_requests"] == 0
    assert after["llamita_generated_tokens_total"] - before["llamita_generated_tokens_total"] < 900


def test_disconnected_non_streaming_request_stops(server):
    before = metrics(server)
    body = json.dumps({"prompt": COUNTING, "max_tokens": 900, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        poll(lambda: metrics(server)["llamita_running_requests"] == 1, "the request to start")
    poll(lambda: metrics(server)['llamita_requests_total{outcome="cancelled"}'] > before[
        'llamita_requests_total{outcome="cancelled"}'], "the cancellation")
    assert metrics(server)["llamita_running_requests"] == 0


def test_full_queue_answers_429():
    """One row and a queue of one: a third request is refused at once, and the server goes on."""
    body = {"prompt": COUNTING, "max_tokens": 900, "temperature": 0, "stream": True}
    with running_server("--max-batch", "1", "--max-queue", "1", "--max-seq-len", "1024") as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as running:
            lines = running.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)  # the first holds the only row
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as waiting:
                assert waiting.status_code == 200
                poll(lambda: metrics(url)["llamita_queue_length"] == 1, "the second request to queue")
                error = assert_error(httpx.post(f"{url}/v1/completions", json=body), 429)
                assert error["code"] == "rate_limit_exceeded"
        poll(lambda: metrics(url)["llamita_running_requests"] + metrics(url)["llamita_queue_length"] == 0,
             "both to be cancelled")
        m = metrics(url)
        assert m['llamita_requests_total{outcome="rejected"}'] == 1
        assert m['llamita_requests_total{outcome="cancelled"}'] == 2
        r = httpx.post(f"{url}/predict", json={"text": "Hello", "max_tokens": 2})
        assert r.status_code == 200 and "generation" in r.json()
