"""Language adherence and degeneration: the share of replies in the expected language, and of looping ones.

Each prompt is answered (greedily by default) and the reply is labelled by py3langid, a language
identifier whose model ships inside the package, so it runs offline (``detect_language``).

A reply loops when its words keep repeating (``loop_coverage``): the words are its lowercased
``\\w+`` runs; a word 4-gram that occurs at least 3 times in the reply is a repeated n-gram, and the
loop coverage is the fraction of the reply's words that lie inside some occurrence of a repeated
n-gram. A reply loops when its coverage exceeds 0.3. This catches a phrase repeated until the token
budget runs out whatever its length (every 4-gram inside a repeated sentence repeats with it, unlike
the single most frequent n-gram, which covers only 4 words of each repetition), while ordinary prose
rarely repeats a 4-gram three times. A reply of fewer than 4 words has coverage 0.

Data: records (JSON Lines or a JSON array) with ``instruction`` (and an optional ``input``, as in
Alpaca data), ``prompt``, ``messages`` (chat) or ``conversations`` (ShareGPT); a conversation is cut
after its last user turn, so the reply is generated where the data's own reply was.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from llamita.chat import Message
from llamita.data import _string, read_records, to_messages
from llamita.errors import LlamitaError
from llamita.eval import loaded
from llamita.eval.generation import first, generated_tokens, replies, settings
from llamita.eval.report import Common, Result, Timer
from llamita.options import option

DATA_HELP = "JSON Lines records with instruction (and input), prompt, messages or conversations"
LOOP_N = 4  # words per n-gram
LOOP_MIN_COUNT = 3  # occurrences that make an n-gram repeated
LOOP_THRESHOLD = 0.3  # coverage above which a reply loops
UNDETERMINED = "und"  # ISO 639's code for "no language identified"
N_EXAMPLES = 5
_PLACEHOLDER_REPLY = {"messages": {"role": "assistant", "content": ""}, "conversations": {"from": "gpt", "value": ""}}


@dataclass
class Options(Common):
    lang: str = option("es", "the language replies should be in: an ISO 639-1 code as py3langid labels it (es, en...)")
    max_new_tokens: int = option(256, "tokens to generate at most per reply")
    temperature: float = option(0.0, "0 = greedy; above 0, sampled (top-p 0.9) from --seed")


# --- scoring -------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def known_languages() -> frozenset[str]:
    """The labels py3langid can give."""
    import py3langid

    return frozenset(lang for lang, _ in py3langid.rank(""))


def detect_language(text: str) -> str:
    """py3langid's label for ``text``, or "und" when it has no evidence (blank text, or none of the
    features its model knows: every language then ties, and its first label would be arbitrary)."""
    import py3langid

    ranked = py3langid.rank(text) if text.strip() else []
    if len(ranked) < 2 or ranked[0][1] == ranked[1][1]:
        return UNDETERMINED
    return ranked[0][0]


def loop_coverage(text: str, n: int = LOOP_N, min_count: int = LOOP_MIN_COUNT) -> float:
    """The fraction of the text's words inside an occurrence of a word n-gram that occurs at least
    ``min_count`` times (the module docstring says why this measure)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] >= min_count:
            covered[i: i + n] = [True] * n
    return sum(covered) / len(words)


def loops(coverage: float) -> bool:
    """Whether a reply with this ``loop_coverage`` is stuck in a loop."""
    return coverage > LOOP_THRESHOLD


# --- reading ---------------------------------------------------------------------------------------------


def read_prompts(source: str | Path) -> list[tuple[str, list[Message]]]:
    """(where, conversation to reply to) for each record of ``source``."""
    return [(where, conversation(record, where)) for where, record in read_records(source)]


def conversation(record: Any, where: str) -> list[Message]:
    """A record's prompt as chat messages: its ``prompt``, or what training reads from it
    (``to_messages``: the same checks, Alpaca's input after the instruction) up to the last user turn."""
    if not isinstance(record, dict):
        raise LlamitaError(f"{where}: expected a JSON object, not {type(record).__name__}")
    if not any(k in record for k in ("instruction", "messages", "conversations")):
        if "prompt" not in record:
            raise LlamitaError(f"{where}: missing field 'instruction' (or 'prompt', 'messages', 'conversations')")
        return [{"role": "user", "content": _string(record, "prompt", where)}]
    messages = to_messages(_with_reply(record), where)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        key = next(k for k in _PLACEHOLDER_REPLY if k in record)
        raise LlamitaError(f"{where}: field {key!r} has no user turn to reply to")
    return messages[: users[-1] + 1]


def _with_reply(record: dict) -> dict:
    """The record with an empty reply after its turns: ``to_messages`` requires one, prompts lack it."""
    if "instruction" in record:
        return {**record, "output": record.get("output", "")}
    key = next(k for k in _PLACEHOLDER_REPLY if k in record)
    turns = record[key]
    return {**record, key: turns + [_PLACEHOLDER_REPLY[key]]} if isinstance(turns, list) and turns else record


# --- the task ---------------------------------------------------------------------------------------------


def run(llm: Any, data: str | Path, **options: Any) -> Result:
    """Reply to every prompt and measure the replies' language and repetition."""
    opts = Options(**options)
    if opts.lang not in known_languages():
        raise LlamitaError(f"--lang {opts.lang!r}: not a language py3langid knows "
                           f"(known: {', '.join(sorted(known_languages()))})")
    prompts = first(read_prompts(data), opts.limit)
    llm = loaded(llm)
    timer = Timer()
    texts = replies(llm, [m for _, m in prompts], [w for w, _ in prompts], opts.batch_size, "lang",
                    max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, seed=opts.seed)
    timing = timer.details(generated_tokens(llm, texts))
    languages = [detect_language(t) for t in texts]
    coverages = [loop_coverage(t) for t in texts]
    n = len(texts)
    metrics = {"lang_share": sum(lang == opts.lang for lang in languages) / n,
               "loop_rate": sum(map(loops, coverages)) / n, "n": n}
    details = {**timing, "lang_counts": dict(Counter(languages).most_common()),
               "examples": _worst(prompts, texts, languages, coverages, opts.lang)}
    return Result("lang", metrics, settings(opts, llm, data), details)


def _worst(prompts: list[tuple[str, list[Message]]], texts: list[str], languages: list[str], coverages: list[float],
           lang: str) -> list[dict[str, Any]]:
    """The few worst replies: wrong language and looping first, then by loop coverage."""
    def badness(i: int) -> tuple[int, float]:  # sorted ascending: the worst first, in file order among equals
        return -((languages[i] != lang) + loops(coverages[i])), -coverages[i]

    order = sorted(range(len(texts)), key=badness)[:N_EXAMPLES]
    return [{"where": prompts[i][0], "prompt": prompts[i][1][-1]["content"], "reply": texts[i],
             "language": languages[i], "loop_coverage": round(coverages[i], 3)} for i in order]
