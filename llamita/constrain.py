"""Grammar constraints for decoding: JSON that a schema accepts, by masking the logits token by token.

llguidance (Microsoft's, the one vLLM, SGLang and llama.cpp use) does the work: it compiles a JSON
schema to a grammar, and for each step it says which tokens of the vocabulary can extend the text
so far towards a match. A ``Constraint`` holds one request's matcher; ``Request.next_token`` masks
the logits with it before sampling (so temperature, top-k and top-p share out the allowed tokens
only) and ``Request.accept`` advances it. Each request carries its own, so constrained and free
requests decode in one batch.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Iterable
from typing import Any

import llguidance
import numpy as np
from torch import Tensor

from llamita.errors import LlamitaError
from llamita.tokenizer import Tokenizer

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # OpenAI's json_object mode
# The separators of Python's json.dumps and no other whitespace: a small model let free to indent
# can emit newlines until max_tokens; a schema's own "x-guidance" key overrides these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class SchemaError(LlamitaError):
    """A JSON schema that llguidance cannot compile (unsupported or invalid); ``reason`` is its words."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.reason = reason


def json_grammar(schema: dict[str, Any], what: str = "json_schema") -> str:
    """llguidance's grammar for ``schema``, checked without a vocabulary (so before a model loads);
    a SchemaError naming the construct at fault otherwise. ``what`` names the schema in the error."""
    if not isinstance(schema, dict):
        raise SchemaError(what, f"a JSON schema is an object, not {type(schema).__name__}")
    try:
        text = json.dumps(schema)  # keys in their order: properties are generated in it
    except (TypeError, ValueError) as e:
        raise SchemaError(what, f"not JSON ({e})") from None
    grammar, error = _compile(text)
    if error:
        raise SchemaError(what, error)
    return grammar


@functools.lru_cache(maxsize=64)
def _compile(schema: str) -> tuple[str, str]:
    """(grammar, error) for a schema's text: a server sees the same few schemas again and again."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        return "", " ".join(str(e).split())
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return grammar, " ".join(messages[0].split()) if failed else ""


class Constraint:
    """One request's grammar state: which tokens may come next (``mask``), what has been taken
    (``advance``), and whether the text is complete (``done``)."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, stop_ids: Iterable[int]):
        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise SchemaError("grammar", " ".join(self.matcher.get_error().split()))
        self.vocab_size = tokenizer.vocab_size
        # The request's own stop tokens end it once the text is complete; the tokenizer's EOS,
        # which llguidance allows then, is left out unless it is one of them.
        self.eos_id = tokenizer.eos_id
        self.stop_ids = np.array(sorted(stop_ids), dtype=np.int64)

    def mask(self, logits: Tensor) -> Tensor:
        """``logits`` [vocab] (float32, CPU) with every token the grammar forbids at -inf, in place,
        including the model's padding past the tokenizer's vocabulary. The work is numpy's, on one
        thread: torch would split each pass over the vocabulary between its threads, and on a busy
        host waiting for them costs milliseconds a token."""
        if self.matcher.is_error():
            raise LlamitaError(f"grammar: {self.matcher.get_error()}")
        forbidden = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8) == 0  # a byte per token
        if self.eos_id is not None:
            forbidden[self.eos_id] = True
        forbidden[self.stop_ids] = not self.matcher.is_accepting()
        values = logits.numpy()
        n = min(self.vocab_size, len(values))
        values[:n][forbidden[:n]] = -np.inf
        values[n:] = -np.inf
        return logits

    def advance(self, token: int) -> None:
        """Take ``token`` (one ``mask`` allowed)."""
        if not self.matcher.consume_token(token):
            raise LlamitaError(f"grammar: token {token} is not allowed here ({self.matcher.get_error()})")

    @property
    def done(self) -> bool:
        """Whether the text is complete and nothing more can follow it."""
        return self.matcher.is_stopped()


def json_constraint(tokenizer: Tokenizer, schema: dict[str, Any], stop_ids: Iterable[int],
                    what: str = "json_schema") -> Constraint:
    """A Constraint to JSON that ``schema`` accepts (``ANY_OBJECT``: any JSON object)."""
    return Constraint(tokenizer, json_grammar(schema, what), stop_ids)


# -- the vocabulary as llguidance reads it ---------------------------------------------------------
_LL_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (each token's bytes, which are special): built once per
    tokenizer, since it costs most of a second."""
    if tokenizer not in _LL_TOKENIZERS:
        _LL_TOKENIZERS[tokenizer] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)))
    return _LL_TOKENIZERS[tokenizer]


class _Vocabulary:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, EOS/BOS and special ids, and encode."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_tokens.values())
        self.tokens = tokenizer.token_bytes

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, special=False)
