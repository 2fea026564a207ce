"""Structured output's cost: the token mask per step, llguidance against outlines-core, on the
default model's vocabulary; and tokens/s of JSON-schema decoding against free decoding.

    python bench/grammar.py                 # 3 schemas, 64 new tokens, 3 runs
    python bench/grammar.py --tokens 32 --runs 1

outlines-core is the comparison's only: ``pip install outlines-core`` (0.2.14 measured) first.

For each schema, one valid token path is made first (llamita's own constrained greedy decoding);
both libraries then walk it: mask for the next token, take the token, over and over. llguidance
(what llamita uses) compiles the schema's grammar in milliseconds and computes each mask lazily
from its parser state; outlines-core turns the schema into a regular expression
(``build_regex_from_schema``) and that into an index of every state's allowed tokens up front
(seconds), then reads each mask from it. "llamita mask" is ``Constraint.mask``: llguidance's mask
applied to a row of logits. The separators are the same on both sides (``", "`` and ``": "``).
Decoding speed is the default model's (float32, greedy), one stream and a batch of 8, with and
without the schema; the constrained rows end when the JSON is complete.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import llguidance
import outlines_core
import torch
from outlines_core.json_schema import build_regex_from_schema
from outlines_core.kernels.torch import fill_next_token_bitmask

from llamita.constrain import json_constraint, json_grammar, ll_tokenizer
from llamita.generate import generate
from llamita.llm import LLM

sys.path.insert(0, str(Path(__file__).parent))
from generate import cpu_ticks, machine, others_load  # noqa: E402  (the sibling bench's helpers)

STRING = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "flat (3 fields)": {
        "type": "object",
        "properties": {"name": STRING, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "email": {"type": "string", "format": "email"}},
        "required": ["name", "age", "email"], "additionalProperties": False,
    },
    "nested + enums": {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {"name": STRING, "role": {"enum": ["admin", "user"]}},
                                "required": ["name", "role"], "additionalProperties": False},
                       "status": {"enum": ["active", "suspended", "deleted"]},
                       "address": {"type": "object", "properties": {"city": STRING, "zip": {"type": "string",
                                                                                              "pattern": "^[0-9]{5}$"}},
                                   "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["user", "status", "address"], "additionalProperties": False,
    },
    "array of objects": {
        "type": "object",
        "properties": {"items": {"type": "array", "maxItems": 4,
                                 "items": {"type": "object",
                                           "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                                                          "label": STRING, "done": {"type": "boolean"}},
                                           "required": ["id", "label", "done"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False,
    },
}
PROMPT = [{"role": "user", "content": "Give me an example record as JSON."}]


def token_path(llm: LLM, schema: dict, tokens: int) -> list[int]:
    """A valid path through the schema: llamita's constrained greedy reply."""
    request = llm.request(llm.encode_chat(PROMPT), json_schema=schema, temperature=0, max_new_tokens=tokens)
    for _ in generate(llm.model, [request]):
        pass
    return request.output_ids


def per_token_us(step, path: list[int], runs: int) -> float:
    """Median over runs of the mean microseconds ``step(state, token)`` takes along ``path``."""
    times = []
    for _ in range(runs):
        state = step(None, None)
        start = time.perf_counter()
        for token in path:
            step(state, token)
        times.append((time.perf_counter() - start) / len(path) * 1e6)
    return statistics.median(times)


def llguidance_rows(llm: LLM, schema: dict, path: list[int], runs: int) -> dict[str, float]:
    tokenizer = ll_tokenizer(llm.tokenizer)
    start = time.perf_counter()
    grammar = json_grammar(schema)
    llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    compile_ms = (time.perf_counter() - start) * 1e3

    def bare(matcher, token):  # the mask alone, as a byte per token
        if matcher is None:
            return llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        matcher.compute_logit_bias()
        matcher.consume_token(token)

    logits = torch.zeros(llm.model.config.vocab_size)

    def ours(constraint, token):  # Constraint.mask on a copy of a row of logits (as Request does), then advance
        if constraint is None:
            return json_constraint(llm.tokenizer, schema, llm.stop_ids)
        constraint.mask(torch.from_numpy(logits.numpy().copy()))
        constraint.advance(token)

    return {"compile_ms": compile_ms, "mask_us": per_token_us(bare, path, runs),
            "llamita_us": per_token_us(ours, path, runs)}


def outlines_rows(llm: LLM, schema: dict, path: list[int], runs: int, vocabulary) -> dict[str, float]:
    start = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(schema), r"[ ]?")
    index = outlines_core.Index(regex, vocabulary)
    build_s = time.perf_counter() - start
    mask = torch.empty(1, (llm.tokenizer.vocab_size + 31) // 32, dtype=torch.int32)

    def step(guide, token):
        if guide is None:
            return outlines_core.Guide(index)
        fill_next_token_bitmask(guide, mask)
        guide.advance(token, return_tokens=False)

    return {"build_s": build_s, "mask_us": per_token_us(step, path, runs)}


def outlines_vocabulary(llm: LLM) -> outlines_core.Vocabulary:
    """outlines-core's vocabulary from the same token bytes llguidance reads (special tokens out)."""
    special = set(llm.tokenizer.special_tokens.values())
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(llm.tokenizer.token_bytes):
        if i not in special:
            by_bytes.setdefault(b, []).append(i)
    return outlines_core.Vocabulary(llm.tokenizer.eos_id, by_bytes)


def tokens_per_second(llm: LLM, schema: dict | None, tokens: int, batch: int) -> float:
    """Tokens/s of ``batch`` greedy replies decoded together (prefill, sampling and masks included)."""
    prompt = llm.encode_chat(PROMPT)
    requests = [llm.request(prompt, json_schema=schema, temperature=0, max_new_tokens=tokens) for _ in range(batch)]
    start = time.perf_counter()
    for _ in generate(llm.model, requests):
        pass
    return sum(len(r.output_ids) for r in requests) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per reply at most")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ticks, began = cpu_ticks(), time.perf_counter()
    llm = LLM.load(quantize="none", dtype=torch.float32)
    start = time.perf_counter()
    ll_tokenizer(llm.tokenizer)
    ll_setup = time.perf_counter() - start
    start = time.perf_counter()
    vocabulary = outlines_vocabulary(llm)
    oc_setup = time.perf_counter() - start

    print(f"Machine: {machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"torch {torch.__version__}, llguidance {version('llguidance')}, outlines-core {version('outlines_core')}; "
          f"vocabulary {llm.tokenizer.vocab_size} tokens (read once: llguidance {ll_setup:.2f} s, "
          f"outlines-core {oc_setup:.2f} s)\n")
    print("| schema | tokens | llguidance compile (ms) | llguidance mask (µs/token) | llamita mask, logits "
          "applied (µs/token) | outlines-core index build (s) | outlines-core mask (µs/token) |")
    print("|---|---|---|---|---|---|---|")
    for name, schema in SCHEMAS.items():
        path = token_path(llm, schema, args.tokens)
        ll = llguidance_rows(llm, schema, path, args.runs)
        oc = outlines_rows(llm, schema, path, args.runs, vocabulary)
        print(f"| {name} | {len(path)} | {ll['compile_ms']:.1f} | {ll['mask_us']:.0f} | {ll['llamita_us']:.0f} | "
              f"{oc['build_s']:.2f} | {oc['mask_us']:.0f} |")

    print("\n| decoding (default model, float32, greedy) | batch | tokens/s |")
    print("|---|---|---|")
    schema = SCHEMAS["nested + enums"]
    for batch in (1, 8):  # free and constrained runs alternate, so that the host's load drifts over both
        runs = [(tokens_per_second(llm, None, args.tokens, batch), tokens_per_second(llm, schema, args.tokens, batch))
                for _ in range(args.runs)]
        free, constrained = (statistics.median(speeds) for speeds in zip(*runs))
        print(f"| free | {batch} | {free:.1f} |")
        print(f"| JSON schema (nested + enums) | {batch} | {constrained:.1f} ({constrained / free - 1:+.0%}) |")
    print(f"\nOther processes' share of the CPU during the run: {others_load(ticks, time.perf_counter() - began):.0%}")


if __name__ == "__main__":
    main()
