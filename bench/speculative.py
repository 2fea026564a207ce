"""Speculative decoding on this CPU, one stream, in one run: plain float32 decoding, self-int4 and
prompt-lookup speculation over the same float32 target, and llama.cpp (plain and with its prompt
lookup) on the same model file, on rewriting prompts (a paragraph to copy with edits: lookup's case).

    python bench/speculative.py --data ../shared/data/bench/wikitext2_test.raw
    python bench/speculative.py --data ... --prompts 2 --new-tokens 96 --lookup 2 --lookup-tokens 10

Each row runs the same chat prompts greedily, end to end (prompt included), and says whether its
output is token for token the plain float32 output (llama.cpp's by text). Tokens/s = tokens
generated / seconds from the request to the last token, summed over the prompts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import cpu_model  # noqa: E402  (the sibling bench's CPU description)

INSTRUCTION = ("Rewrite the following paragraph with normal punctuation and spacing (\"@-@\" is a hyphen), "
               "keeping every word:\n\n")


def paragraphs(path: Path, count: int, words: int) -> list[str]:
    """The first ``count`` paragraphs of at least ``words`` words of a wikitext file, cut to ``words`` words."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line.startswith("=") and len(line.split()) >= words:
            found.append(" ".join(line.split()[:words]))
        if len(found) == count:
            break
    return found


def llamita_rows(new_tokens: int, args) -> tuple[dict[str, Callable], object]:
    """name -> run(prompt ids) -> (output ids, stats or None); and the float32 LLM."""
    from llamita.cache import KVCache
    from llamita.generate import LookupDrafter, ModelDrafter, SpeculationStats, complete, self_int4, speculate
    from llamita.llm import LLM

    llm = LLM.load(None, dtype=torch.float32, quantize="none")  # the embedded default's weights, in float32
    model = llm.model

    def plain(ids: list[int]):
        r = llm.request(ids, temperature=0, max_new_tokens=new_tokens)
        for _ in complete(model, KVCache(model, 1, len(ids) + new_tokens), [r]):
            pass
        return r.output_ids, None

    def speculative(drafter, k: int):
        def run(ids: list[int]):
            r, stats = llm.request(ids, temperature=0, max_new_tokens=new_tokens), SpeculationStats()
            for _ in speculate(model, KVCache(model, 1, len(ids) + new_tokens), r, drafter, k, stats):
                pass
            return r.output_ids, stats
        return run

    rows = {"llamita float32, plain": plain,
            f"llamita float32, self-int4 draft (k={args.draft_tokens})":
                speculative(ModelDrafter(self_int4(model)), args.draft_tokens),
            f"llamita float32, lookup (n={args.lookup}, k={args.lookup_tokens})":
                speculative(LookupDrafter(args.lookup), args.lookup_tokens)}
    return rows, llm


def llama_cpp_rows(path: Path, new_tokens: int, threads: int, args) -> dict[str, Callable]:
    """llama.cpp greedy on the same GGUF, plain and with its prompt-lookup draft; output as text."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    def engine(draft):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, verbose=False, draft_model=draft)

        def run(ids: list[int]):
            llm.reset()  # no prompt cache between runs: every row pays its prompt
            out = llm.create_completion(ids, max_tokens=new_tokens, temperature=0.0, top_k=1)
            return out["choices"][0]["text"], out["usage"]["completion_tokens"]
        return run

    return {f"llama.cpp {llama_cpp.__version__}, plain": engine(None),
            f"llama.cpp {llama_cpp.__version__}, prompt lookup (n={args.lookup}, k={args.lookup_tokens})":
                engine(LlamaPromptLookupDecoding(max_ngram_size=args.lookup, num_pred_tokens=args.lookup_tokens))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="wikitext-2 raw text (../shared/data/bench/...)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--words", type=int, default=80, help="words of each paragraph")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--lookup", type=int, default=2, help="n-gram size (llama.cpp's max_ngram_size)")
    parser.add_argument("--lookup-tokens", type=int, default=10, help="tokens drafted (llama.cpp's num_pred_tokens)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llamita import assets

    texts = paragraphs(args.data, args.prompts, args.words)
    ours, llm = llamita_rows(args.new_tokens, args)
    prompts = [llm.encode_chat([{"role": "user", "content": INSTRUCTION + t}]) for t in texts]
    theirs = llama_cpp_rows(assets.default_model_path(), args.new_tokens, args.threads, args)
    load_before = os.getloadavg()
    for run in [*ours.values(), *theirs.values()]:
        run(prompts[0][:32])  # warm-up
    reference: list[list[int]] = []
    table = []
    for name, run in [*ours.items(), *theirs.items()]:
        tokens, seconds, same, drafted, accepted, passes, produced = 0, 0.0, True, 0, 0, 0, 0
        for i, ids in enumerate(prompts):
            start = time.perf_counter()
            out, extra = run(ids)
            seconds += time.perf_counter() - start
            if isinstance(out, str):  # llama.cpp: text, and its token count
                tokens += extra
                same &= out == llm.tokenizer.decode(reference[i])
                continue
            tokens += len(out)
            if name == next(iter(ours)):  # the plain float32 row, run first: the reference
                reference.append(out)
            same &= out == reference[i]
            if extra is not None:
                drafted, accepted, passes, produced = (drafted + extra.drafted, accepted + extra.accepted,
                                                       passes + extra.passes, produced + extra.tokens)
        acceptance = f"{accepted / drafted:.0%}" if drafted else "-"
        per_pass = f"{produced / passes:.2f}" if passes else "-"
        table.append(f"| {name} | {tokens / seconds:.1f} | {acceptance} | {per_pass} | {'yes' if same else 'no'} |")
        print(table[-1], file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"- machine: {cpu_model()}, {args.threads} threads; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (other processes share the machine)")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- prompts: {len(prompts)} chat prompts ({', '.join(str(len(p)) for p in prompts)} tokens): rewrite a "
          f"{args.words}-word wikitext-2 paragraph; greedy, at most {args.new_tokens} new tokens\n")
    print("| engine | tokens/s (prompt included) | drafts accepted | tokens per target pass | "
          "same output as plain float32 |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(table))


if __name__ == "__main__":
    main()
