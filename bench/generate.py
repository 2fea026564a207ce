"""Decode and prefill speed on this machine: llamita (float32, bfloat16, int4) against transformers
and llama.cpp, all on the same model file, in one run.

    python bench/generate.py                        # the embedded default model, 2 threads
    python bench/generate.py --runs 5 --only llamita-int4,transformers-fp32
    python bench/generate.py --llama-cpp-python /path/to/venv/bin/python   # llama_cpp in another venv
    python bench/generate.py --prefill-only --runs 8 --only llamita-fp32,llamita-int4,transformers-fp32

Decode: batch 1, greedy, ``--new-tokens`` tokens after a short chat prompt, timed from the first
new token to the last (the prompt's forward pass is not counted). Prefill: one forward pass over a
``--prompt-tokens`` prompt, logits of its last position only. Every engine is loaded and warmed
up first, then the runs go round the engines in turn, so that a burst of load from elsewhere on
a shared machine hits them alike; the table gives medians, and the others' share of the CPU
during the runs, since the numbers are only as quiet as the machine was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROWS = ["llamita-fp32", "llamita-bf16", "llamita-fp16", "llamita-int4", "llamita-int4-compile", "transformers-fp32",
        "llama.cpp"]
CHAT_PROMPT = "What is the capital of France? Answer in a few sentences and tell me about its history."


@dataclass
class Engine:
    """One row: ``decode(prompt, n)`` makes n greedy tokens and returns a timestamp per token;
    ``prefill(prompt)`` runs one forward pass over the prompt."""

    name: str
    decode: Callable[[list[int], int], list[float]]
    prefill: Callable[[list[int]], None]
    note: str = ""
    runs: list[float] = field(default_factory=list)  # decode tokens/s of each run
    steps: list[float] = field(default_factory=list)  # seconds between consecutive tokens, all runs
    prefills: list[float] = field(default_factory=list)  # prefill tokens/s of each run


def llamita_engine(source: str | None, kind: str, compile: bool = False) -> Engine:
    """float32 / bfloat16 weights, float16 linear layers (``--quantize float16``), or int4 ones with
    bfloat16 activations; ``compile``: decoding steps through torch.compile, as
    ``LLM.load(compile=True)`` runs them."""
    from llamita.cache import KVCache
    from llamita.generate import cache_size_for, decode_step, prefill
    from llamita.llm import LLM

    dtype, quantize = {"fp32": (torch.float32, "none"), "bf16": (torch.bfloat16, "none"), "fp16": (None, "float16"),
                       "int4": (None, "int4")}[kind]
    llm = LLM.load(source, dtype=dtype, quantize=quantize, compile=compile)
    model = llm.model

    @torch.inference_mode()
    def decode(prompt: list[int], n: int) -> list[float]:
        cache = KVCache(model, 1, cache_size_for(len(prompt) + n, model.config.max_seq_len, compile))
        token = int(prefill(model, cache, [llm.request(prompt, temperature=0)])[0].argmax())
        stamps = [time.perf_counter()]
        for i in range(n - 1):
            token = int(decode_step(model, cache, [token], [len(prompt) + i], forward=llm.forward)[0].argmax())
            stamps.append(time.perf_counter())
        return stamps

    @torch.inference_mode()
    def run_prefill(prompt: list[int]) -> None:
        prefill(model, KVCache(model, 1, len(prompt) + 1), [llm.request(prompt, temperature=0)])

    return Engine(f"llamita {kind}" + (" + torch.compile" if compile else ""), decode, run_prefill,
                  note="decoding compiled, once per process" if compile else "")


def transformers_engine(path: Path) -> Engine:
    """transformers' own GGUF load (dequantized to float32) and its ``generate``."""
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    class Stamp(LogitsProcessor):  # called once per new token, right after its forward pass
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    @torch.inference_mode()
    def decode(prompt: list[int], n: int) -> list[float]:
        stamp = Stamp()
        model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                       max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       logits_processor=LogitsProcessorList([stamp]), pad_token_id=0)  # batch 1: never padded
        return stamp.stamps

    @torch.inference_mode()
    def prefill(prompt: list[int]) -> None:
        model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)

    return Engine(f"transformers {transformers.__version__} fp32", decode, prefill)


# The llama.cpp row runs in a child process, so that llama-cpp-python may live in another venv:
# it answers one JSON request per line (decode: a timestamp per token; prefill: nothing).
LLAMA_CPP_CHILD = r"""
import json, sys, time
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=2048, n_batch=512, n_threads=int(sys.argv[2]),
                      n_threads_batch=int(sys.argv[2]), verbose=False)
print(json.dumps(llama_cpp.__version__), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request["n"]:
        stamps = []
        for _ in llm.generate(request["prompt"], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == request["n"]:
                break
        print(json.dumps(stamps), flush=True)
    else:
        llm.reset()
        llm.eval(request["prompt"])
        print("null", flush=True)
"""


def start_child(code: str, path: Path, threads: int, python: str | None) -> tuple[subprocess.Popen, str]:
    """A child running llama-cpp-python ``code`` on ``path`` (in ``python``, an interpreter that has
    llama_cpp; default: this one, if it has), and the version it reports on its first line."""
    import importlib.util

    if python is None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ImportError(name="llama_cpp")
        python = sys.executable
    child = subprocess.Popen([python, "-c", code, str(path), str(threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return child, json.loads(child.stdout.readline())


def llama_cpp_engine(path: Path, threads: int, python: str | None) -> Engine:
    """llama.cpp through llama-cpp-python (``python``: an interpreter that has it), on the
    file's own quantized weights."""
    child, version = start_child(LLAMA_CPP_CHILD, path, threads, python)

    def ask(prompt: list[int], n: int):
        child.stdin.write(json.dumps({"prompt": prompt, "n": n}) + "\n")
        child.stdin.flush()
        return json.loads(child.stdout.readline())

    return Engine(f"llama.cpp (llama-cpp-python {version})", ask, lambda prompt: ask(prompt, 0),
                  note="its own Q4_1 kernels")


def run_once(engine: Engine, short: list[int], long: list[int], new_tokens: int, decode: bool = True) -> None:
    """Decode, then prefill; or, with ``decode`` False, an untimed prefill before the timed one, so
    that each engine's prefill is measured warm whatever ran before it."""
    if decode:
        stamps = engine.decode(short, new_tokens)
        if len(stamps) != new_tokens:
            raise RuntimeError(f"{engine.name}: produced {len(stamps)} tokens, asked for {new_tokens}")
        engine.runs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        engine.steps += [b - a for a, b in zip(stamps, stamps[1:])]
    else:
        engine.prefill(long)
    t = time.perf_counter()
    engine.prefill(long)
    engine.prefills.append(len(long) / (time.perf_counter() - t))


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    own = os.times()
    return sum(fields) - fields[3] - fields[4], round((own.user + own.system) * os.sysconf("SC_CLK_TCK"))


def others_load(start: tuple[int, int], seconds: float) -> float:
    """Share of the machine's CPU time that other processes used since ``start``."""
    busy, own = cpu_ticks()
    capacity = seconds * os.sysconf("SC_CLK_TCK") * os.cpu_count()
    return max(0.0, (busy - start[0]) - (own - start[1])) / capacity


def cpu_model() -> str:
    """The CPU, as every benchmark records it: model, cores and vector instructions."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")),
                 platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = "AVX-512" if " avx512f" in flags else "AVX2" if " avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores ({isa})"


def machine() -> str:
    return f"{cpu_model()}, {torch.get_num_threads()} torch threads"


def add_engine_args(parser: argparse.ArgumentParser, rows: list[str]) -> None:
    """The flags every side-by-side bench takes: runs, threads, where llama_cpp lives, which rows."""
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-cpp-python", help="a Python that has llama_cpp (default: this one, when it has)")
    parser.add_argument("--only", help="comma-separated rows (default: all): " + ",".join(rows))


def gguf_file(parser: argparse.ArgumentParser, source: str | None) -> Path:
    """The GGUF file every engine loads (``source`` or the default model); anything else: a usage error."""
    from llamita.formats import detect

    fmt, path = detect(source)
    if fmt != "gguf":
        parser.error("this bench compares engines on one GGUF file")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", help="model: a .gguf file (default: the embedded default model)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    add_engine_args(parser, ROWS)
    parser.add_argument("--prefill-only", action="store_true",
                        help="no decoding; each timed prefill follows an untimed one of the same engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llamita.tokenizer import load_tokenizer

    path = gguf_file(parser, args.source)
    tokenizer = load_tokenizer(args.source)
    short = tokenizer.encode(CHAT_PROMPT, bos=tokenizer.add_bos)
    text = " ".join(Path(__file__).read_text().split())  # any real text: the cost does not depend on it
    long = (tokenizer.encode(text, bos=tokenizer.add_bos) * (args.prompt_tokens // 100 + 1))[: args.prompt_tokens]

    makers: dict[str, Callable[[], Engine]] = {  # keys: ROWS
        "llamita-fp32": lambda: llamita_engine(args.source, "fp32"),
        "llamita-bf16": lambda: llamita_engine(args.source, "bf16"),
        "llamita-fp16": lambda: llamita_engine(args.source, "fp16"),
        "llamita-int4": lambda: llamita_engine(args.source, "int4"),
        "llamita-int4-compile": lambda: llamita_engine(args.source, "int4", compile=True),
        "transformers-fp32": lambda: transformers_engine(path),
        "llama.cpp": lambda: llama_cpp_engine(path, args.threads, args.llama_cpp_python),
    }
    engines, skipped = [], []
    for key in args.only.split(",") if args.only else ROWS:
        try:
            engine = makers[key]()
        except ImportError as e:
            skipped.append((key, f"skipped: {e.name} is not importable (see --llama-cpp-python)"))
            continue
        print(f"warming up {engine.name}", file=sys.stderr, flush=True)
        engine.decode(short, 8)
        engine.prefill(long)
        engines.append(engine)

    start, t0 = cpu_ticks(), time.monotonic()
    for i in range(args.runs):
        for engine in engines:
            print(f"run {i + 1}/{args.runs}: {engine.name}", file=sys.stderr, flush=True)
            run_once(engine, short, long, args.new_tokens, decode=not args.prefill_only)
    others = others_load(start, time.monotonic() - t0)

    print(f"- machine: {machine()}")
    print(f"- date: {datetime.date.today()}; torch {torch.__version__}; Python {platform.python_version()}")
    print(f"- model: {path.name}")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- other processes used {others:.0%} of the CPU during the runs")
    decoding = ("no decoding, each timed prefill after an untimed one" if args.prefill_only else
                f"decode: batch 1, greedy, {args.new_tokens} new tokens after a {len(short)}-token prompt")
    print(f"- {decoding}; prefill: a {len(long)}-token prompt; {args.runs} runs each\n")
    print("| engine | decode tokens/s, median run (range) | decode tokens/s, median step "
          "| prefill tokens/s, median (range) | note |")
    print("| --- | --- | --- | --- | --- |")
    for e in engines:
        decoded = (f"{statistics.median(e.runs):.1f} ({min(e.runs):.1f}-{max(e.runs):.1f}) "
                   f"| {1 / statistics.median(e.steps):.1f}") if e.runs else "- | -"
        print(f"| {e.name} | {decoded} "
              f"| {statistics.median(e.prefills):.0f} ({min(e.prefills):.0f}-{max(e.prefills):.0f}) | {e.note} |")
    for key, note in skipped:
        print(f"| {key} | - | - | - | {note} |")


if __name__ == "__main__":
    main()
