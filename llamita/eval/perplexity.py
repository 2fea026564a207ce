"""Perplexity of text files, by the convention of llama.cpp, of GPTQ's papers or of a sliding window.

Each convention is named and defined so numbers compare with the tool that quotes them:

- ``llamacpp`` (llama.cpp's ``perplexity``): the text tokenized once (BOS first where the model adds
  one), cut into ``len // ctx`` chunks of ``ctx`` tokens (the rest dropped), each chunk's first token
  replaced by BOS (where the model adds one), and only the predictions of tokens ``ctx/2 + 1 ..
  ctx-1`` of each chunk scored; perplexity = exp(total NLL / tokens scored).
- ``gptq`` (the 5.47 of Llama-2-7B on WikiText-2): documents joined with "\\n\\n", tokenized once
  (BOS first where the model adds one), ``len // ctx`` non-overlapping windows, every prediction
  inside a window scored; perplexity = exp(mean over windows of the window's mean NLL).
- ``stride`` (transformers' perplexity guide): windows of ``ctx`` tokens starting every ``stride``
  tokens, each token (but the first) scored once, by the first window that holds it past the
  previous window's end (so with the longest context the windows give it); perplexity =
  exp(total NLL / tokens scored).

Several files, or blank-line-separated records in one file, are documents joined with "\\n\\n".
Bits per byte: total NLL in bits over the UTF-8 bytes of the scored tokens' text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from llamita.errors import LlamitaError
from llamita.eval import loaded
from llamita.eval.generation import first
from llamita.eval.report import Common, Result, Timer
from llamita.eval.score import score
from llamita.options import option
from llamita.tokenizer import Tokenizer

DATA_HELP = "text files (UTF-8): documents joined with a blank line between them"
MODES = ("llamacpp", "gptq", "stride")
DEFAULT_CTX = {"llamacpp": 512, "gptq": 2048, "stride": 2048}


@dataclass
class Options(Common):
    mode: str = option("llamacpp", "llamacpp (llama.cpp's perplexity tool), gptq (non-overlapping windows, the "
                       "convention of GPTQ papers) or stride (transformers' sliding window)", choices=MODES)
    ctx: int | None = option(None, "tokens per window (default: 512 for llamacpp, 2048 otherwise, at most the "
                             "model's context)")
    stride: int | None = option(None, "--mode stride: tokens the window moves by (default: ctx / 2)")


@dataclass
class Window:
    """``ids[start:end]`` fed (its first token possibly replaced by BOS); tokens ``ids[first:end]`` scored."""

    ids: list[int]
    first: int  # index in ids of the first scored token (>= 1)


def read_text(files: list[str | Path]) -> str:
    """The documents of ``files`` joined with "\\n\\n" (records: blocks between blank lines)."""
    docs = []
    for file in files:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise LlamitaError(f"{path}: cannot be read as UTF-8 text ({e})") from None
        records = [r for r in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")) if r.strip()]
        if not records:
            raise LlamitaError(f"{path}: no text")
        docs += records
    return "\n\n".join(docs)


def windows(ids: list[int], mode: str, ctx: int, stride: int, bos: int | None) -> list[Window]:
    """The windows each convention scores (see the module's docstring)."""
    if mode == "llamacpp":
        chunks = [ids[i * ctx: (i + 1) * ctx] for i in range(len(ids) // ctx)]
        return [Window([bos] + c[1:] if bos is not None else c, ctx // 2 + 1) for c in chunks]
    if mode == "gptq":
        return [Window(ids[i * ctx: (i + 1) * ctx], 1) for i in range(len(ids) // ctx)]
    out, scored_to = [], 1
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        out.append(Window(ids[begin:end], scored_to - begin))
        scored_to = end
        if end == len(ids):
            break
    return out


def run(llm, data: str | Path | list[str | Path], **options) -> Result:
    o = Options(**options)
    files = [data] if isinstance(data, (str, Path)) else list(data)
    text = read_text(files)
    llm = loaded(llm)
    window_limit = llm.model.config.max_seq_len
    ctx = o.ctx or min(DEFAULT_CTX[o.mode], window_limit)
    stride = o.stride or ctx // 2
    if not 2 <= ctx <= window_limit:
        raise LlamitaError(f"--ctx {ctx}: must be between 2 and the model's context window ({window_limit})")
    if o.mode == "stride" and not 1 <= stride <= ctx:
        raise LlamitaError(f"--stride {stride}: must be between 1 and --ctx ({ctx})")
    tok: Tokenizer = llm.tokenizer
    timer = Timer()
    # Special-token text as each reference reads it: llama.cpp's perplexity tokenizes with parse_special
    # off; GPTQ's script and transformers' guide call transformers' tokenizer, which parses it.
    ids = tok.encode(text, bos=tok.add_bos, special=o.mode != "llamacpp")
    if len(ids) < ctx:
        raise LlamitaError(f"{', '.join(map(str, files))}: {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    wins = first(windows(ids, o.mode, ctx, stride, tok.bos_id if tok.add_bos else None), o.limit)
    scored = score(llm.model, [(w.ids, w.first) for w in wins], o.batch_size, desc=f"perplexity ({o.mode})")
    nll = [-s.total for s in scored]
    tokens = sum(len(s.logprobs) for s in scored)
    if o.mode == "gptq":
        ppl = math.exp(sum(n / len(s.logprobs) for n, s in zip(nll, scored)) / len(scored))
    else:
        ppl = math.exp(sum(nll) / tokens)
    nbytes = sum(_text_bytes(tok, w.ids, w.first) for w in wins)
    metrics = {"perplexity": ppl, "bits_per_byte": sum(nll) / math.log(2) / nbytes, "tokens": tokens}
    settings = {"mode": o.mode, "ctx": ctx, "stride": stride if o.mode == "stride" else None,
                "files": [str(f) for f in files], "bos": tok.add_bos, "windows": len(wins), "limit": o.limit,
                "batch_size": o.batch_size}
    fed = sum(len(w.ids) - 1 for w in wins)
    return Result("perplexity", metrics, settings, {"bytes": nbytes, **timer.details(fed)})


def _text_bytes(tok: Tokenizer, ids: list[int], first: int) -> int:
    """UTF-8 bytes of the text of ``ids[first:]``, as it reads after ``ids[:first]``."""
    return len(tok.decode(ids, special=False).encode()) - len(tok.decode(ids[:first], special=False).encode())
