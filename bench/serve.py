"""Serving speed: aggregate tokens/s and median time to first token for 1, 4 and 16 concurrent
streaming clients, llamita's server against llama.cpp's (llama-cpp-python) on the same GGUF file.

    python bench/serve.py     # the default model: llamita float32, int4, float16; llama.cpp
    python bench/serve.py --llamita int4 --clients 1 4 16
    python bench/serve.py --llama-cpp-python /path/to/venv/bin/python   # llama_cpp in another venv
    python bench/serve.py --llamita float16 --clients 16 64 --system-tokens 300   # a shared system prompt

Each server runs in its own subprocess on loopback with ``--threads`` threads. Each client streams one
``/v1/completions`` request (greedy, ``--max-tokens`` new tokens, a short story opening of its own as
the prompt); all clients of a level start together. Time to first token is from sending the
request to the first chunk with text; aggregate tokens/s is every client's tokens (from the usage
chunk when the server sends one, else text chunks) over the time from the start to the last one
done. With ``--system-tokens N``, each client streams a ``/v1/chat/completions`` request instead: a
system prompt of about N tokens that all clients share, then a question of its own. llama-cpp-python's
server runs with ``--interrupt_requests False`` (by default a new request
aborts the stream in progress). Other processes' CPU load during the run is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from generate import cpu_ticks, machine  # noqa: E402  (the sibling bench's machine description)

NAMES = ["Ada", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemi", "Luca",
         "Mira", "Nils", "Olga", "Pablo"]


SENT = itertools.count()  # numbers every prompt sent


def prompt(i: int) -> str:
    """Client i's prompt, opened by a number of its own, so that a server can reuse at most a token
    or two of an earlier request's cached prompt (both would reuse a whole repeated prompt:
    llamita by cache row, llama.cpp its last prompt's)."""
    return (f"Story {next(SENT)}. {NAMES[i % len(NAMES)]} lived in a small village by the sea. Every morning, "
            "before the sun rose, she walked down to the harbour to watch the fishing boats come in. One day,")


@dataclass
class Level:
    clients: int
    tokens: int
    seconds: float
    ttfts: list[float]
    others: float = 0.0  # share of the machine's CPU that other processes used meanwhile

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds


def system_prompt(tokens: int, count: Callable[[str], int]) -> str:
    """A system prompt of at least ``tokens`` tokens (by ``count``), as long ones are: numbered rules."""
    rules: list[str] = []
    while count(" ".join(rules)) < tokens:
        rules.append(f"Rule {len(rules) + 1}: answer briefly, kindly and in plain words.")
    return " ".join(rules)


async def one_client(http: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int,
                     system: str | None) -> tuple[float, int]:
    """(time to first token, tokens) of one streamed completion; with ``system``, a chat completion."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if system is None:
        body["prompt"], path = prompt(i), "completions"
    else:
        question = f"Question {next(SENT)}: tell me about {NAMES[i % len(NAMES)]}'s village by the sea."
        body["messages"], path = [{"role": "system", "content": system}, {"role": "user", "content": question}], \
            "chat/completions"
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with http.stream("POST", f"{url}/v1/{path}", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            choice = data["choices"][0] if data.get("choices") else {}
            if choice.get("text") or choice.get("delta", {}).get("content"):
                chunks += 1
                first = first or time.perf_counter()
    if first is None:
        raise RuntimeError(f"client {i}: no text came back")
    return first - start, usage["completion_tokens"] if usage else chunks


async def level(url: str, model: str, clients: int, max_tokens: int, system: str | None = None) -> Level:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, url, model, i, max_tokens, system)
                                         for i in range(clients)))
        seconds = time.perf_counter() - start
    return Level(clients, sum(n for _, n in results), seconds, [t for t, _ in results])


class Server:
    """A server subprocess on a loopback port, ready once /v1/models answers."""

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str]):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/bench-serve-{port}.log", "w")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        for _ in range(1200):  # up to 10 minutes: loading (and a first compile) can be slow
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {self.log.name}")
            try:
                self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]
                return
            except (httpx.TransportError, KeyError, ValueError):
                time.sleep(0.5)
        raise RuntimeError(f"{name} did not start: see {self.log.name}")

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def measure(server: Server, clients: int, max_tokens: int, system: str | None) -> Level:
    """One level against one server, with the other processes' load while it ran."""
    (busy0, own0), server0, t0 = cpu_ticks(), server.cpu_ticks(), time.monotonic()
    result = asyncio.run(level(server.url, server.model, clients, max_tokens, system))
    (busy, own), capacity = cpu_ticks(), (time.monotonic() - t0) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
    result.others = max(0, (busy - busy0) - (own - own0) - (server.cpu_ticks() - server0)) / capacity
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="model: .gguf file (default: the embedded default model)")
    parser.add_argument("--llamita", nargs="*", choices=["float32", "int4", "float16"],
                        default=["float32", "int4", "float16"],
                        help="llamita's weights: float32 (dequantized from the GGUF file), --quantize int4, "
                             "--quantize float16")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=None,
                        help="chat completions sharing a system prompt of about this many tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="report the run with the median throughput")
    parser.add_argument("--port", type=int, default=8790, help="the first server's loopback port; then +1, +2")
    parser.add_argument("--llama-cpp-python", default=None,
                        help="a Python with llama_cpp[server] installed (default: this one, if it has it)")
    args = parser.parse_args()

    from llamita import assets, load_tokenizer

    gguf = Path(args.source) if args.source else assets.default_model_path()
    system = None
    if args.system_tokens:
        tokenizer = load_tokenizer(gguf)
        system = system_prompt(args.system_tokens, lambda text: len(tokenizer.encode(text)))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    commands = [(f"llamita {kind}", [sys.executable, "-m", "llamita", "serve", "--model", str(gguf),
                                     "--max-batch", str(max(args.clients)), "--max-seq-len", "1024",
                                     "--quantize", "none" if kind == "float32" else kind, "--port"])
                for kind in args.llamita]
    notes = []
    lcpp_python = args.llama_cpp_python or (sys.executable if importlib.util.find_spec("llama_cpp") else None)
    if lcpp_python:
        version = subprocess.run([lcpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
        commands.append((f"llama.cpp (llama-cpp-python {version}, one request at a time)",
                         [lcpp_python, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", "2048",
                          "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                          "--interrupt_requests", "False", "--port"]))
    else:
        notes.append("llama.cpp: skipped, llama_cpp is not importable (pip install 'llama-cpp-python[server]', "
                     "or pass --llama-cpp-python)")

    # All servers up at once (an idle one costs nothing) and the levels interleaved across them, so
    # that a change in the machine's other load falls on every server alike.
    servers: list[Server] = []
    results: dict[tuple[str, int], list[Level]] = {}
    try:
        for i, (name, command) in enumerate(commands):
            print(f"starting {name} ...", file=sys.stderr, flush=True)
            servers.append(Server(name, [*command, str(args.port + i)], args.port + i, env))
            asyncio.run(level(servers[-1].url, servers[-1].model, 1, 8))  # warm-up
        for run in range(args.runs):
            for clients in args.clients:
                for server in servers:
                    print(f"run {run + 1}: {server.name}, {clients} clients", file=sys.stderr, flush=True)
                    results.setdefault((server.name, clients), []).append(
                        measure(server, clients, args.max_tokens, system))
    finally:
        for server in servers:
            server.close()

    print(f"- machine: {machine()}; each server: {args.threads} threads")
    print(f"- date: {datetime.date.today()}, Python {platform.python_version()}")
    print(f"- model: {gguf.name}")
    print(f"- command: `python {' '.join(sys.argv)}`")
    what = "/v1/completions" if system is None else \
        f"/v1/chat/completions, a shared system prompt of {args.system_tokens}+ tokens and a question of its own"
    print(f"- each client: one streamed {what}, greedy, {args.max_tokens} new tokens; "
          f"of {args.runs} run(s), the one with the median throughput\n")
    print("| server | clients | aggregate tokens/s | median TTFT (s) | max TTFT (s) | tokens | other load |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for server in servers:
        for clients in args.clients:
            runs = sorted(results[server.name, clients], key=lambda lv: lv.throughput)
            lv = runs[len(runs) // 2]
            print(f"| {server.name} | {clients} | {lv.throughput:.1f} | {statistics.median(lv.ttfts):.2f} "
                  f"| {max(lv.ttfts):.2f} | {lv.tokens} | {lv.others:.0%} |")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
