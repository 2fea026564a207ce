"""Tokenizers for Llama-architecture checkpoints, found the same way as their weights.

Two libraries do all the work, so our ids are theirs:

* ``sentencepiece`` for Llama 2's ``tokenizer.model`` and for a GGUF whose vocabulary is
  SentencePiece (``tokenizer.ggml.model == "llama"``): we rebuild the ``ModelProto`` from the GGUF's
  pieces, scores and types rather than reimplement SentencePiece's BPE.
* ``tokenizers`` for an HF ``tokenizer.json`` and for a GGUF with a byte-level BPE vocabulary
  (``tokenizer.ggml.model == "gpt2"``), rebuilt from the file's vocabulary and merges.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from llamita.errors import LlamitaError
from llamita.files import read_json
from llamita.formats import detect

_PIECE = sp_pb2.ModelProto.SentencePiece  # piece types; GGUF's token_type uses the same numbers (1..6)


def special_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching the special tokens written in text, leftmost and longest first ("</s>" before
    "<s"...), as llama.cpp's ``parse_special`` and transformers' added-token split find them."""
    by_length = sorted((t for t in tokens if t), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None


class _SentencePiece:
    """A SentencePiece model. Special pieces are split out of the text first, as llama.cpp does with
    ``parse_special``: each piece of plain text in between gets SentencePiece's dummy prefix."""

    kind = "sentencepiece"

    def __init__(self, proto: sp_pb2.ModelProto, source: Path):
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except (RuntimeError, OSError, ValueError) as e:
            raise LlamitaError(f"{source}: not a usable SentencePiece model ({e})") from None
        special_types = (_PIECE.CONTROL, _PIECE.UNKNOWN, _PIECE.USER_DEFINED)
        self.special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in special_types and p.piece}
        # sentencepiece's decode hides control pieces and prints <unk> as " ⁇ "; these we may show as text.
        self._marks = {i for i, p in enumerate(proto.pieces) if p.type in (_PIECE.CONTROL, _PIECE.UNKNOWN)}
        self._split = special_pattern(self.special)
        self.vocab_size = len(proto.pieces)

    def encode(self, text: str, special: bool) -> list[int]:
        if not special or self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def decode(self, ids: list[int], special: bool) -> str:
        if not special or not self._marks.intersection(ids):
            return self.sp.decode(ids)
        out, run = [], []
        for i in ids:  # mirror encode: plain text between special pieces is decoded on its own
            if i in self._marks:
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None  # piece_to_id answers unk_id for unknowns


class _Tokenizers:
    """A ``tokenizers.Tokenizer``; it matches added tokens in the text itself, as transformers does."""

    kind = "tokenizers"

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.special = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool) -> list[int]:
        self.tok.encode_special_tokens = not special  # True: special added tokens are split like plain text
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=not special)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


def _overlaps(span: tuple[int, int], spans: Sequence[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in spans)


def _markup(text: str, plain_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The stretches of ``text`` outside the spans, in order."""
    out, at = [], 0
    for start, end in sorted(plain_spans):
        if start > at:
            out.append((at, start))
        at = max(at, end)
    return out + ([(at, len(text))] if at < len(text) else [])


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    other 68 for U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def unpaired_surrogate(text: str) -> int | None:
    """Where ``text`` holds a lone UTF-16 surrogate (JSON's ``"\\ud800"``, or undecodable bytes
    read with ``surrogateescape``), which is not Unicode and which no tokenizer can encode; None if nowhere."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def surrogate_error(text: str, at: int) -> str:
    """What is wrong at ``at`` (the character escaped: it cannot be written out as UTF-8 either)."""
    return f"an unpaired surrogate (U+{ord(text[at]):04X}) at character {at} is not valid Unicode text"


class Tokenizer:
    """Text <-> ids for one checkpoint, with what generation and chat need to know about it.

    ``encode`` takes text as text by default (``special=False``, as ``sp.encode`` and Meta's reference
    do): ``"<s>"`` or ``"<|im_end|>"`` written in a prompt are characters, never control tokens, so
    user text cannot forge them. ``special=True`` parses them into their ids, as transformers'
    tokenizer does, for callers that must match it. ``decode`` shows control tokens as their text by
    default (``special=True``); ``special=False`` drops them.
    """

    def __init__(
        self,
        backend: _SentencePiece | _Tokenizers,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        source: Path,
    ):
        self._backend = backend
        self.kind: str = backend.kind
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos  # whether plain prompts should start with BOS for this checkpoint
        self.chat_template = chat_template
        self.source = source
        self.special_tokens: dict[str, int] = dict(backend.special)
        self.vocab_size: int = backend.vocab_size
        self._special = special_pattern(self.special_tokens)

    def encode(self, text: str, bos: bool = False, eos: bool = False, special: bool = False) -> list[int]:
        if (at := unpaired_surrogate(text)) is not None:
            raise LlamitaError(f"cannot tokenize: {surrogate_error(text, at)}")
        ids = self._backend.encode(text, special)
        if bos:
            ids = [self._require(self.bos_id, "BOS")] + ids
        if eos:
            ids = ids + [self._require(self.eos_id, "EOS")]
        return ids

    def encode_marked(self, text: str, plain_spans: Sequence[tuple[int, int]], bos: bool = False) -> list[int]:
        """``text`` with its special tokens parsed except where one overlaps a ``plain_spans`` span
        (``[start, end)`` character offsets): a chat prompt whose markup may hold control tokens and
        whose message contents never do. Without such an overlap the ids are ``encode(text,
        special=True)``'s exactly (transformers' ids); with one, the text is cut at the special tokens
        found outside the spans, each taken by id, and the pieces between encoded as plain text (the
        way the special-token split encodes them)."""
        matches = list(self._special.finditer(text)) if self._special else []
        if not any(_overlaps(m.span(), plain_spans) for m in matches):
            return self.encode(text, bos=bos, special=True)
        ids = [self._require(self.bos_id, "BOS")] if bos else []
        done = 0
        for start, end in _markup(text, plain_spans):  # matched afresh inside the markup only
            for m in self._special.finditer(text, start, end):  # type: ignore[union-attr]
                if m.start() > done:
                    ids += self.encode(text[done : m.start()])
                ids.append(self.special_tokens[m.group()])
                done = m.end()
        return ids + (self.encode(text[done:]) if done < len(text) else [])

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], special)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry as stored (``▁Hello``, ``Ġworld``, ``<0x0A>``), not its text."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token stands for (a token's stored form is never shorter than its
        text), so text over ``n`` times this cannot fit in ``n`` tokens: a bound known before tokenizing."""
        return max(len(self.id_to_token(i) or "") for i in range(self.vocab_size))

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for (grammar masks, llama.cpp's /tokenize pieces): a byte-level
        BPE piece (``Ġworld``) through GPT-2's byte alphabet; a SentencePiece piece with ``▁`` as a
        space and ``<0xNN>`` as that byte; a special token as its text."""
        pieces = [self.id_to_token(i) or "" for i in range(self.vocab_size)]
        special = set(self.special_tokens.values())
        alphabet = _byte_alphabet()
        byte_level = self.kind == "tokenizers" and all(
            set(p) <= alphabet.keys() for i, p in enumerate(pieces) if i not in special)
        out = []
        for i, piece in enumerate(pieces):
            if i in special:
                out.append(piece.encode())
            elif byte_level:
                out.append(bytes(alphabet[c] for c in piece))
            elif m := _BYTE_PIECE.fullmatch(piece):
                out.append(bytes([int(m[1], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out

    def save_tokenizer_json(self, path: str | Path) -> None:
        """Write the vocabulary as an HF ``tokenizer.json`` (byte-level BPE / tokenizer.json sources)."""
        if not isinstance(self._backend, _Tokenizers):
            raise LlamitaError(f"{self.source}: a SentencePiece tokenizer is written as tokenizer.model, "
                               "not tokenizer.json")
        self._backend.tok.save(str(path))

    def _require(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise LlamitaError(f"{self.source}: the tokenizer defines no {name} token")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, source={str(self.source)!r})"


class StreamDecoder:
    """Turns generated ids into text as they arrive; the chunks join to exactly ``decode(all ids)``.

    A token cannot be decoded alone: SentencePiece drops the leading space of the first piece it
    decodes, and a byte token (``<0xE2>``, or a byte-level BPE piece) may hold part of a character.
    So we decode a short window -- the tokens of the last emitted chunk plus the new ones -- and emit
    what the new ones added, holding it back while it ends in an incomplete character (U+FFFD).
    The window starts where an emitted chunk began, so both decodes treat its start alike.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = True):
        self.tokenizer = tokenizer
        self.special = special
        self._ids: list[int] = []  # the window: [last emitted chunk | pending tokens]
        self._read = 0  # where the pending tokens start in the window

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. a character the stream ended in the middle of)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self._ids[: self._read], self.special)
        after = decode(self._ids, self.special)
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        self._ids, self._read = self._ids[self._read :], len(self._ids) - self._read
        return after[len(before) :]


def load_tokenizer(source: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint: a GGUF file, an HF directory or a Meta directory
    (``None`` or the default model's name: the embedded default GGUF), or a directory holding only a
    tokenizer (as ``llamita tokenizer train`` writes it, and as transformers' AutoTokenizer loads one)."""
    if source is not None and _tokenizer_only(path := Path(source).expanduser()):
        return _from_hf(path)
    fmt, path = detect(source)
    if fmt == "gguf":
        from llamita.formats.gguf import gguf_metadata, open_gguf

        return _from_gguf(gguf_metadata(open_gguf(path)), path)
    if fmt == "meta":
        return _from_meta(path)
    return _from_hf(path)


# --- GGUF -------------------------------------------------------------------------------------------


def sentencepiece_model_from_gguf(path: str | Path) -> bytes:
    """The ``tokenizer.model`` file equivalent to a GGUF's SentencePiece vocabulary, e.g. to write an
    HF or Meta checkpoint from a GGUF."""
    from llamita.formats.gguf import gguf_metadata, open_gguf

    path = Path(path)
    meta = gguf_metadata(open_gguf(path))
    tokens = meta.get("tokenizer.ggml.tokens")
    if meta.get("tokenizer.ggml.model") != "llama" or not tokens:
        raise LlamitaError(f"{path}: no SentencePiece vocabulary (tokenizer.ggml.model is not 'llama')")
    types = meta.get("tokenizer.ggml.token_type") or [_PIECE.NORMAL] * len(tokens)
    return _sentencepiece_proto(meta, tokens, types).SerializeToString()


def _from_gguf(meta: dict[str, Any], path: Path) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise LlamitaError(f"{path}: no tokenizer in this GGUF file (tokenizer.ggml.model or .tokens missing)")
    types = meta.get("tokenizer.ggml.token_type") or [_PIECE.NORMAL] * len(tokens)
    if model == "llama":
        backend: _SentencePiece | _Tokenizers = _SentencePiece(_sentencepiece_proto(meta, tokens, types), path)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True)  # llama.cpp's default for SentencePiece
    elif model == "gpt2":
        backend = _Tokenizers(_byte_level_bpe(meta, tokens, types, path))
        add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
    else:
        raise LlamitaError(f"{path}: tokenizer.ggml.model {model!r} is not supported (supported: 'llama', 'gpt2')")
    return Tokenizer(
        backend,
        bos_id=meta.get("tokenizer.ggml.bos_token_id", 1 if model == "llama" else None),
        eos_id=meta.get("tokenizer.ggml.eos_token_id", 2 if model == "llama" else None),
        add_bos=bool(add_bos),
        chat_template=meta.get("tokenizer.chat_template"),
        source=path,
    )


def _sentencepiece_proto(meta: dict[str, Any], tokens: list[str], types: list[int]) -> sp_pb2.ModelProto:
    """The ModelProto Llama 2's tokenizer.model holds, rebuilt from the GGUF's copy of it."""
    proto = sp_pb2.ModelProto()
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    for piece, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=piece, score=score, type=kind if 1 <= kind <= 6 else _PIECE.NORMAL)
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        setattr(trainer, f"{name}_id", token_id if token_id is not None and token_id < len(tokens) else -1)
        if token_id is not None and token_id < len(tokens):
            setattr(trainer, f"{name}_piece", tokens[token_id])
    norm = proto.normalizer_spec  # as in Llama 2's tokenizer.model
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


# Pre-tokenizer splits, by llama.cpp's `tokenizer.ggml.pre` name.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own regex


def _smollm_pre() -> pre_tokenizers.PreTokenizer:
    # SmolLM's tokenizer.json: every digit alone, then GPT-2's split (llama.cpp: "\p{N}" then GPT-2's regex).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _llama3_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_PRE_TOKENIZERS = {
    "default": _gpt2_pre,
    "gpt-2": _gpt2_pre,
    "smollm": _smollm_pre,
    "llama3": _llama3_pre,
    "llama-v3": _llama3_pre,
    "llama-bpe": _llama3_pre,
}
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}  # Llama 3 takes a word whole when it is in the vocab


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], path: Path) -> tokenizers.Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise LlamitaError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise LlamitaError(f"{path}: byte-level BPE vocabulary without tokenizer.ggml.merges")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    respell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        # Added tokens are matched as raw text; a normal one outside the byte alphabet (rare) is respelled into it.
        if kind not in (_PIECE.CONTROL, _PIECE.USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(piece for piece, _ in respell.pre_tokenize_str(token))
        vocab[token] = i
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise LlamitaError(f"{path}: tokenizer.ggml.merges has an entry that is not two tokens joined by one space")
    tok = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    kinds = list(zip(tokens, types))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in kinds if k == _PIECE.CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in kinds if k == _PIECE.USER_DEFINED])
    return tok


# --- Hugging Face and Meta directories --------------------------------------------------------------


def _tokenizer_only(path: Path) -> bool:
    """A directory with tokenizer files but no model config (config.json, params.json)."""
    return (path.is_dir() and not any((path / n).is_file() for n in ("config.json", "params.json"))
            and any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")))


def _from_hf(path: Path) -> Tokenizer:
    config = _read_json(path / "tokenizer_config.json")
    if (path / "tokenizer.json").is_file():  # preferred: it also carries added tokens and the exact pipeline
        backend: _SentencePiece | _Tokenizers = _Tokenizers(_load_tokenizer_json(path / "tokenizer.json"))
    elif (path / "tokenizer.model").is_file():
        backend = _SentencePiece(_load_sentencepiece(path / "tokenizer.model"), path / "tokenizer.model")
    else:
        raise LlamitaError(f"{path}: no tokenizer.json or tokenizer.model in this checkpoint directory")
    specials = {**_read_json(path / "special_tokens_map.json"), **config}
    model_config = _read_json(path / "config.json")
    sp = backend.sp if isinstance(backend, _SentencePiece) else None
    bos_id = _special_id(backend, specials.get("bos_token"), model_config.get("bos_token_id"), sp and sp.bos_id())
    eos_id = _special_id(backend, specials.get("eos_token"), model_config.get("eos_token_id"), sp and sp.eos_id())
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    elif isinstance(backend, _Tokenizers):  # e.g. Llama 3: BOS comes from tokenizer.json's post-processor
        add_bos = bos_id is not None and backend.tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    else:
        add_bos = True  # SentencePiece Llama
    return Tokenizer(backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos,
                     chat_template=_hf_chat_template(path, config), source=path)


def _from_meta(path: Path) -> Tokenizer:
    # Meta's download puts tokenizer.model beside the weights or one level up (shared by all sizes).
    model = next((d / "tokenizer.model" for d in (path, path.parent) if (d / "tokenizer.model").is_file()), None)
    if model is None:
        raise LlamitaError(f"{path}: no tokenizer.model here or in {path.parent}")
    backend = _SentencePiece(_load_sentencepiece(model), model)
    bos, eos = backend.sp.bos_id(), backend.sp.eos_id()
    return Tokenizer(backend, bos_id=bos if bos >= 0 else None, eos_id=eos if eos >= 0 else None,
                     add_bos=True, chat_template=None, source=model)


def _load_sentencepiece(file: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(file.read_bytes())
    except Exception as e:  # protobuf's DecodeError, or an OSError
        raise LlamitaError(f"{file}: not a SentencePiece model ({type(e).__name__}: {e})") from None
    if not proto.pieces:
        raise LlamitaError(f"{file}: not a SentencePiece model (no pieces)")
    return proto


def _load_tokenizer_json(file: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise LlamitaError(f"{file}: not a readable tokenizer.json ({e})") from None


def _read_json(file: Path) -> dict[str, Any]:
    """An optional config file: empty when absent, else ``read_json``'s checks."""
    return read_json(file) if file.is_file() else {}


def _special_id(backend: _SentencePiece | _Tokenizers, token: Any, config_id: Any, sp_id: int | None) -> int | None:
    """A special token's id: tokenizer_config's spelling (a string or an AddedToken dict) wins, then
    config.json's id, then what the SentencePiece model itself says (-1: none)."""
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and (token_id := backend.token_to_id(token)) is not None:
        return token_id
    if isinstance(config_id, list):  # config.json may list several EOS ids; the first is the main one
        config_id = config_id[0] if config_id else None
    if isinstance(config_id, int):
        return config_id
    return sp_id if sp_id is not None and sp_id >= 0 else None


def _hf_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    if (path / "chat_template.jinja").is_file():  # newer transformers save it beside tokenizer_config
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the "default" one is for chat
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None
