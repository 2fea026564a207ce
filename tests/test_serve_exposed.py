"""What exposing the server needs: API keys, llama.cpp's /tokenize and /detokenize, the context
length in /v1/models, a prompt prefix shared across cache rows, and a graceful SIGTERM.

In-process tests drive the app over httpx's ASGI transport; the keyed server and its shutdown run
as ``llamita serve`` in a subprocess on loopback, driven by the official openai client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

import httpx  # a missing test dependency fails the module loudly: no skips
import openai
import pytest
from fastapi.routing import APIRoute

import llamita.serve.app as serve_app
from helpers import free_port, poll
from llamita.serve.app import create_app
from llamita.serve.routes import router

KEY = "sk-test-0123456789"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding keeps counting: a stream that runs until stopped


async def in_process(app, work) -> Any:
    """``work(client)`` against ``app`` with its engine running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
            return await work(client)


def metrics(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


# -- keys -------------------------------------------------------------------------------------------
def test_api_key_env_and_checks(monkeypatch):
    monkeypatch.setenv("LLAMITA_API_KEY", "one,two")
    assert serve_app.api_keys(["three"]) == ["three", "one", "two"]
    for bad in ["", " padded ", "ключ", "tab\there"]:
        with pytest.raises(llamita_error(), match="API key must be printable ASCII"):
            serve_app.api_keys([bad])


def llamita_error() -> type:
    from llamita.errors import LlamitaError

    return LlamitaError


def test_warning_when_exposed_without_a_key(default_llm, monkeypatch, capsys):
    monkeypatch.delenv("LLAMITA_API_KEY", raising=False)
    started = []
    monkeypatch.setattr(serve_app, "graceful_server", lambda config, engine, timeout: started.append(config.host)
                        or type("Idle", (), {"run": lambda self: None})())
    serve_app.serve(default_llm, host="0.0.0.0", port=1)
    serve_app.serve(default_llm, host="127.0.0.1", port=1)
    serve_app.serve(default_llm, host="0.0.0.0", port=1, api_key=[KEY])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "without an API key" in line]
    assert started == ["0.0.0.0", "127.0.0.1", "0.0.0.0"]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0]


# -- /tokenize, /detokenize, /v1/models ----------------------------------------------------------------
def test_tokenize_detokenize_and_context_length(default_llm, hf_smol):
    text = "Hola, ¿qué tal? <|im_start|>system"
    app = create_app(default_llm, max_batch=1, max_seq_len=512)

    async def work(client):
        plain = (await client.post("/tokenize", json={"content": text})).json()["tokens"]
        parsed = (await client.post("/tokenize", json={"content": text, "parse_special": True})).json()["tokens"]
        pieces = (await client.post("/tokenize", json={"content": text, "with_pieces": True})).json()["tokens"]
        back = (await client.post("/detokenize", json={"tokens": parsed})).json()["content"]
        bad = await client.post("/detokenize", json={"tokens": [10**6]})
        card = (await client.get("/v1/models")).json()["data"][0]
        return plain, parsed, pieces, back, bad, card

    plain, parsed, pieces, back, bad, card = asyncio.run(in_process(app, work))
    assert plain == hf_smol.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert parsed == hf_smol.encode(text, add_special_tokens=False)
    assert hf_smol.convert_tokens_to_ids("<|im_start|>") in parsed and hf_smol.convert_tokens_to_ids(
        "<|im_start|>") not in plain
    # llama.cpp's shape: a piece that is not whole UTF-8 (half of "¿") comes as its bytes
    assert [p["id"] for p in pieces] == plain
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text and any(isinstance(p["piece"], list) for p in pieces)
    assert back == hf_smol.decode(parsed) == text
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert card["max_model_len"] == 512


# -- prefix sharing -------------------------------------------------------------------------------------
@pytest.mark.slow  # 16 generations
def test_shared_system_prompt_runs_once(default_llm):
    """8 requests with the same ~300-token system prompt, sent together: the prompt is computed once
    (the others copy it from the row that ran it) and every answer is what the request gets alone."""
    system = " ".join(f"Rule {i}: answer briefly, kindly and in plain words." for i in range(30))
    questions = ["What is a llama?", "Name a color.", "Where is Peru?", "Say hello.", "What is two plus two?",
                 "Name a fruit.", "Why is the sky blue?", "Count to three."]
    conversations = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions]
    prompts = [default_llm.encode_chat(c) for c in conversations]
    shared = len(os.path.commonprefix(prompts))
    assert shared >= 300
    app = create_app(default_llm, max_batch=8, max_seq_len=1024)

    async def work(client):
        bodies = [{"messages": c, "temperature": 0, "max_tokens": 8} for c in conversations]
        answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
        return [a.json()["choices"][0]["message"]["content"] for a in answers], (await client.get("/metrics")).text

    answers, text = asyncio.run(in_process(app, work))
    m = metrics(text)
    total = sum(map(len, prompts))
    assert m["llamita_prompt_tokens_total"] == total
    assert total - m["llamita_prompt_tokens_cached_total"] <= total - 7 * shared  # the shared start ran once
    assert m["llamita_prompt_tokens_copied_total"] >= 7 * shared
    assert m["llamita_prefix_cache_hit_ratio"] == pytest.approx(m["llamita_prompt_tokens_cached_total"] / total,
                                                                abs=1e-6)
    alone = [default_llm.chat_batch([c], temperature=0, max_new_tokens=8)[0] for c in conversations]
    assert answers == alone


# -- a keyed server, and its shutdown ----------------------------------------------------------------
def routes_and_methods() -> list[tuple[str, str]]:
    return [(r.path.replace("{name:path}", "x"), sorted(r.methods)[0]) for r in router.routes
            if isinstance(r, APIRoute) and r.path not in serve_app.PUBLIC_PATHS]


def read_stream(url: str, key: str, out: list, started: threading.Event) -> None:
    body = {"prompt": COUNTING, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300,
                      headers={"Authorization": f"Bearer {key}"}) as response:
        for line in response.iter_lines():
            if line:
                out.append(line)
                started.set()


@pytest.mark.slow
def test_keyed_server_and_graceful_sigterm():
    """Without the key, 401 on every route but /health; with it, the openai client works. SIGTERM
    during 4 running streams: each ends well-formed (a finish chunk, then [DONE]), the process exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llamita", "serve", "--port", str(port), "--quantize", "none",
                                 "--api-key", KEY, "--max-seq-len", "1024", "--shutdown-timeout", "2"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            poll(lambda: alive(url, proc), "the server's /health", tries=1200)
            for path, method in routes_and_methods():
                for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
                    r = httpx.request(method, f"{url}{path}", headers=headers, json={})
                    assert r.status_code == 401, (path, headers, r.status_code)
                    assert r.json()["error"]["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
            reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4, temperature=0)
            assert reply.choices[0].message.content and reply.usage.completion_tokens <= 4

            streams = [[] for _ in range(4)]
            started = [threading.Event() for _ in streams]
            readers = [threading.Thread(target=read_stream, args=(url, KEY, s, e)) for s, e in zip(streams, started)]
            for reader in readers:
                reader.start()
            for event in started:
                assert event.wait(300), "a stream never started"
            proc.send_signal(signal.SIGTERM)
            for reader in readers:
                reader.join(120)
            assert proc.wait(120) == 0, read(log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for lines in streams:
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text.startswith(" 9, 10,")  # counting went on until the shutdown ended it


def alive(url: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, f"the server exited with {proc.returncode}"
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


def read(log) -> str:
    log.seek(0)
    return log.read()[-4000:]
