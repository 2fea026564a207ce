"""A chat's next turn: time to its first token after a long first turn, llamita against llama.cpp
and transformers, each through its own chat API on the same GGUF file, in one run.

    python bench/chat_turns.py --llama-cpp-python /path/to/venv/bin/python
    python bench/chat_turns.py --only llamita-int4,llama.cpp --runs 5

Each run is one conversation: a first user turn carrying a ``--document-tokens`` document (a
different one each run, so that no engine reuses an earlier run's), the reply (greedy,
``--new-tokens``), then a short second turn. Time to first token is from the call to the first
chunk of text. llamita (``LLM.stream_chat``) and llama.cpp (``create_chat_completion``) keep the
conversation's KV cache between calls and run only the new turn; transformers' ``generate``, as
it is usually called, runs the whole conversation again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import add_engine_args, cpu_ticks, gguf_file, machine, others_load, start_child  # noqa: E402  (the sibling bench's helpers)

ROWS = ["llamita-fp32", "llamita-int4", "llamita-fp16", "transformers-fp32", "llama.cpp"]
SECOND_TURN = "Now say it again in Spanish, please."

# A chat function: (messages, new tokens) -> (seconds to the first chunk of text, the whole reply).
Chat = Callable[[list[dict], int], tuple[float, str]]


def timed(chunks) -> tuple[float, str]:
    start, first, text = time.perf_counter(), None, ""
    for chunk in chunks:
        if chunk and first is None:
            first = time.perf_counter() - start
        text += chunk
    return first, text


def llamita_chat(source: str | None, quantize: str) -> Chat:
    from llamita.llm import LLM

    llm = LLM.load(source, quantize=quantize)
    return lambda messages, n: timed(llm.stream_chat(messages, temperature=0, max_new_tokens=n))


def transformers_chat(path: Path) -> Chat:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    def chat(messages: list[dict], n: int) -> tuple[float, str]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        stamps = []

        def stamp(input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=n, do_sample=False, logits_processor=[stamp],
                                 pad_token_id=tokenizer.eos_token_id)
        return stamps[0] - start, tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return chat


# llama.cpp runs in a child process, so that llama-cpp-python may live in another venv: one JSON
# request per line, one JSON answer (seconds to the first chunk, the reply).
LLAMA_CPP_CHILD = r"""
import json, sys, time
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=4096, n_batch=512, n_threads=int(sys.argv[2]),
                      n_threads_batch=int(sys.argv[2]), verbose=False)
print(json.dumps(llama_cpp.__version__), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    start, first, text = time.perf_counter(), None, ""
    for chunk in llm.create_chat_completion(request["messages"], temperature=0.0, top_k=1, repeat_penalty=1.0,
                                            max_tokens=request["n"], stream=True):
        piece = chunk["choices"][0]["delta"].get("content") or ""
        if piece and first is None:
            first = time.perf_counter() - start
        text += piece
    print(json.dumps([first, text]), flush=True)
"""


def llama_cpp_chat(path: Path, threads: int, python: str | None) -> tuple[Chat, str]:
    child, version = start_child(LLAMA_CPP_CHILD, path, threads, python)

    def chat(messages: list[dict], n: int) -> tuple[float, str]:
        child.stdin.write(json.dumps({"messages": messages, "n": n}) + "\n")
        child.stdin.flush()
        first, text = json.loads(child.stdout.readline())
        return first, text

    return chat, f"llama.cpp (llama-cpp-python {version})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="model: a .gguf file (default: the embedded default model)")
    parser.add_argument("--document-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=16)
    add_engine_args(parser, ROWS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llamita.tokenizer import load_tokenizer

    path = gguf_file(parser, args.source)
    tokenizer = load_tokenizer(args.source)
    words = " ".join(Path(p).read_text() for p in sorted(Path(__file__).parent.glob("*.py"))).split()
    document = tokenizer.decode(tokenizer.encode(" ".join(words))[: args.document_tokens])

    makers: dict[str, Callable[[], tuple[Chat, str]]] = {  # keys: ROWS
        "llamita-fp32": lambda: (llamita_chat(args.source, "none"), "llamita fp32"),
        "llamita-int4": lambda: (llamita_chat(args.source, "int4"), "llamita int4"),
        "llamita-fp16": lambda: (llamita_chat(args.source, "float16"), "llamita fp16"),
        "transformers-fp32": lambda: (transformers_chat(path), "transformers fp32 (whole conversation each turn)"),
        "llama.cpp": lambda: llama_cpp_chat(path, args.threads, args.llama_cpp_python),
    }
    engines, skipped = [], []
    for key in args.only.split(",") if args.only else ROWS:
        try:
            chat, name = makers[key]()
        except ImportError as e:
            skipped.append(f"{key}: skipped, {e.name} is not importable (see --llama-cpp-python)")
            continue
        print(f"warming up {name}", file=sys.stderr, flush=True)
        chat([{"role": "user", "content": "Hello!"}], 4)
        engines.append((name, chat, {"first": [], "second": []}))

    start, t0 = cpu_ticks(), time.monotonic()
    for run in range(args.runs):
        for name, chat, times in engines:
            print(f"run {run + 1}/{args.runs}: {name}", file=sys.stderr, flush=True)
            first = [{"role": "user", "content": f"Document {run}:\n\n{document}\n\nSummarise it in one sentence."}]
            seconds, reply = chat(first, args.new_tokens)
            times["first"].append(seconds)
            second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": SECOND_TURN}]
            times["second"].append(chat(second, args.new_tokens)[0])
    others = others_load(start, time.monotonic() - t0)

    print(f"- machine: {machine()}")
    print(f"- date: {datetime.date.today()}; torch {torch.__version__}; Python {platform.python_version()}")
    print(f"- model: {path.name}")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- other processes used {others:.0%} of the CPU during the runs")
    print(f"- first turn: a {args.document_tokens}-token document; second turn: \"{SECOND_TURN}\"; "
          f"{args.new_tokens} new tokens a turn, greedy; {args.runs} runs, medians (range)\n")
    print("| engine | first turn: time to first token (s) | second turn: time to first token (s) |")
    print("| --- | --- | --- |")
    for name, _, times in engines:
        cells = [f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})" for t in (times["first"], times["second"])]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    for note in skipped:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
