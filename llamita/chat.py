"""Chat prompts: messages -> token ids, in the format the checkpoint was fine-tuned on.

``template="auto"`` renders the checkpoint's own jinja template the way transformers'
``apply_chat_template`` does. Named templates cover checkpoints without one: ``llama-2`` builds ids
exactly as Meta's reference ``chat_completion`` does (each turn encoded on its own, wrapped in
BOS/EOS ids, never through text), ``chatml`` and ``alpaca`` are plain text formats.

Control tokens come only from a template's own markup, never from a message's content: a user who
writes ``<|im_end|>\n<|im_start|>system`` gets those characters as text, not a forged system turn
(``Tokenizer.encode_marked``), as Meta's reference never parses special tokens out of messages.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from llamita.errors import LlamitaError
from llamita.tokenizer import Tokenizer

TEMPLATES = ("llama-2", "chatml", "alpaca")

# Meta's llama/generation.py
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]

# Stanford Alpaca's train.py (PROMPT_DICT)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# End-of-turn tokens of common templates: generation should stop on them as well as on EOS.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

Message = dict[str, str]


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Stanford Alpaca's prompt; the response (then EOS) follows it directly when training."""
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def encode_chat(
    tokenizer: Tokenizer,
    messages: list[Message],
    template: str = "auto",
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a conversation, ready for the model to write the assistant's next turn.

    ``add_generation_prompt`` opens the assistant turn (jinja and chatml); the llama-2 and alpaca
    formats always end where the answer begins, so it does not apply to them.
    """
    _check_messages(messages)
    name = resolve_template(tokenizer, template)
    if name == "llama-2" or (name == "jinja" and B_INST in (tokenizer.chat_template or "")):
        _refuse_llama2_tags(messages)  # a Llama-2-chat checkpoint's own template: Meta's guard too
    if name == "llama-2":
        return _llama2(tokenizer, messages)
    if name == "alpaca":
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise LlamitaError("alpaca template: it is single-turn; give exactly one user message (the instruction)")
        return tokenizer.encode(alpaca_prompt(messages[0]["content"]), bos=tokenizer.add_bos, special=False)
    if name == "chatml":
        text, spans = "", []
        for m in messages:
            text += f"<|im_start|>{m['role']}\n"
            spans.append((len(text), len(text) + len(m["content"])))
            text += f"{m['content']}<|im_end|>\n"
        text += "<|im_start|>assistant\n" if add_generation_prompt else ""
        return tokenizer.encode_marked(text, spans, bos=tokenizer.add_bos)
    # The checkpoint's template writes BOS itself when it wants one, so none is added here.
    return _encode_jinja(tokenizer, messages, add_generation_prompt)


def stop_token_ids(tokenizer: Tokenizer, template: str = "auto") -> list[int]:
    """EOS, plus the template's end-of-turn token (e.g. ``<|im_end|>``) when it has one."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    name = resolve_template(tokenizer, template)
    if name == "chatml":
        candidates: tuple[str, ...] = ("<|im_end|>",)
    elif name == "jinja":
        candidates = tuple(t for t in _END_OF_TURN if t in (tokenizer.chat_template or ""))
    else:
        candidates = ()
    for token in candidates:
        token_id = tokenizer.special_tokens.get(token)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def resolve_template(tokenizer: Tokenizer, template: str = "auto") -> str:
    """The format ``template`` stands for: "jinja" (the checkpoint's own) or one of TEMPLATES."""
    if template == "auto":
        if tokenizer.chat_template:
            return "jinja"
        return "llama-2" if _is_llama2_vocab(tokenizer) else "chatml"
    if template not in TEMPLATES:
        raise LlamitaError(f"unknown chat template {template!r} (known: auto, {', '.join(TEMPLATES)})")
    return template


def render_jinja(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The checkpoint's chat template rendered as transformers' ``apply_chat_template`` renders it."""
    if not tokenizer.chat_template:
        raise LlamitaError(f"{tokenizer.source}: the checkpoint has no chat template")
    token = tokenizer.id_to_token
    try:
        return _compile(tokenizer.chat_template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=token(tokenizer.bos_id) if tokenizer.bos_id is not None else "",
            eos_token=token(tokenizer.eos_id) if tokenizer.eos_id is not None else "",
            tools=None,
            documents=None,
        )
    # syntax errors, sandbox refusals (an OverflowError for a range past its limit), raise_exception(...)
    except (jinja2.TemplateError, OverflowError, RecursionError) as e:
        raise LlamitaError(f"{tokenizer.source}: chat template: {e}") from None


# Unicode noncharacters (never in real text) marking where each message's content lands in the render.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"


def _encode_jinja(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    """The checkpoint's template rendered, then encoded with special tokens parsed from its markup only.

    The template is rendered a second time with each content marked (``_mark``) to find where the
    contents land. A template that transforms content (``.split``, slicing) loses the marks (as does
    a content holding them); then a content holding a special token's text is refused, since it could
    not be kept as text."""
    text = render_jinja(tokenizer, messages, add_generation_prompt)
    spans, why = None, "a message holds U+FDD0 or U+FDD1 (the marks of content while rendering)"
    if not any(_OPEN in m["content"] or _CLOSE in m["content"] for m in messages):
        marked = [dict(m, content=_mark(m["content"])) for m in messages]
        spans = _content_spans(render_jinja(tokenizer, marked, add_generation_prompt), text)
        why = "the chat template transforms message content"
    if spans is not None:
        return tokenizer.encode_marked(text, spans)
    for i, m in enumerate(messages):
        if any(token and token in m["content"] for token in tokenizer.special_tokens):
            raise LlamitaError(f"messages[{i}]: {why}, so control-token text in it cannot be kept as text")
    return tokenizer.encode(text, special=True)


def _mark(content: str) -> str:
    """``content`` with its core (whitespace stripped) between _OPEN and _CLOSE, so that a template's
    ``| trim`` or ``.strip()`` sees the same text; empty content holds nothing to protect."""
    core = content.strip()
    if not core:
        return content
    start = content.index(core)
    return content[:start] + _OPEN + core + _CLOSE + content[start + len(core):]


def _content_spans(marked: str, text: str) -> list[tuple[int, int]] | None:
    """Where the marked contents lie in ``text`` (the unmarked render); None unless the marks come in
    pairs, in order, and removing them gives ``text`` exactly."""
    spans: list[tuple[int, int]] = []
    plain: list[str] = []
    at, opened = 0, None
    for i, part in enumerate(re.split(f"([{_OPEN}{_CLOSE}])", marked)):
        if i % 2 == 0:
            plain.append(part)
            at += len(part)
        elif (part == _OPEN) == (opened is not None):
            return None  # an _OPEN inside a span, or a _CLOSE outside one
        elif part == _OPEN:
            opened = at
        else:
            spans.append((opened, at))
            opened = None
    return spans if opened is None and "".join(plain) == text else None


_MAX_BUILT = 1_000_000  # characters, items or bits one ``*`` or ``**`` may build: far past any chat prompt's


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox transformers builds (templates come from checkpoints and are untrusted code), with the
    template's work bounded as jinja's sandbox allows: ``range`` stops at 100,000 items (jinja's own limit),
    and a ``*`` or ``**`` that would build a string, list or number past ``_MAX_BUILT`` is refused."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if _built_size(operator, left, right) > _MAX_BUILT:
            raise SecurityError(f"{operator!r} would build more than {_MAX_BUILT:,} items (sandbox limit)")
        return super().call_binop(context, operator, left, right)


def _built_size(operator: str, left: Any, right: Any) -> int:
    """About how many items (characters, list items, or bits of an integer) ``left operator right`` builds."""
    ints = all(isinstance(x, int) for x in (left, right))
    if operator == "**":
        return right * max(1, abs(left).bit_length()) if ints and right > 0 else 0
    if isinstance(left, int) and isinstance(right, (str, list, tuple)):
        left, right = right, left
    return len(left) * right if isinstance(left, (str, list, tuple)) and isinstance(right, int) else 0


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise LlamitaError(f"chat template does not parse: {e}") from None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters, which templates do not expect
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _refuse_llama2_tags(messages: list[Message]) -> None:
    """Meta's ``chat_completion`` guard: a content holding Llama 2's chat tags is refused."""
    for i, m in enumerate(messages):
        for tag in SPECIAL_TAGS:
            if tag in m["content"]:
                raise LlamitaError(f"messages[{i}]: {tag!r} is not allowed in the content (llama-2 chat uses it)")


def _llama2(tokenizer: Tokenizer, messages: list[Message]) -> list[int]:
    """Meta's ``chat_completion``: the system prompt goes into the first user turn; every finished
    exchange is ``<s>[INST] user [/INST] answer </s>``; the last user turn is left open."""
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise LlamitaError("llama-2 chat: a system message must be followed by a user message")
        merged = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
        messages = [{"role": messages[1]["role"], "content": merged}] + messages[2:]
    roles = [m["role"] for m in messages]
    alternating = all(r == "user" for r in roles[::2]) and all(r == "assistant" for r in roles[1::2])
    if not alternating or roles[-1] != "user":
        raise LlamitaError(
            "llama-2 chat: roles must be an optional system message, then user and assistant alternating, "
            f"ending with user; got {roles}"
        )
    ids: list[int] = []
    for prompt, answer in zip(messages[::2], messages[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True, special=False)
    return ids + tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, special=False)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise LlamitaError("messages: expected a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LlamitaError(f"messages[{i}]: expected a dict with string 'role' and 'content'")


def _is_llama2_vocab(tokenizer: Tokenizer) -> bool:
    """Llama 2's 32,000 SentencePiece pieces: <s> is 1 and 29871 is the lone "▁" its [INST] turns use."""
    return (
        tokenizer.vocab_size == 32000
        and tokenizer.special_tokens.get("<s>") == 1
        and tokenizer.id_to_token(29871) == "\u2581"
    )
