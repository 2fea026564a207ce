"""``llamita tokenizer train``: a SentencePiece BPE vocabulary trained the way Meta trained Llama 2's.

The settings are those stored in Meta's ``tokenizer.model`` (its ``trainer_spec`` and
``normalizer_spec``), so the result encodes text the way Llama 2's tokenizer does -- digits one by
one, spaces kept as they are, unknown characters as UTF-8 bytes -- and loads wherever Llama 2's does:
``load_tokenizer``, transformers' ``LlamaTokenizer``, ``convert`` to GGUF.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from llamita.errors import LlamitaError
from llamita.files import atomic_write, not_utf8, umask
from llamita.formats.export import write_tokenizer_config
from llamita.shards import corpus_files, documents

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BYTE_PIECES = 256  # byte_fallback's <0x00>..<0xFF>
SPECIAL_PIECES = 3  # <unk> <s> </s>

# Llama 2's trainer_spec and normalizer_spec as read from Meta's tokenizer.model (tests/data holds
# the dump); left out: Meta's machine (input, model_prefix, num_threads), the sample size, and two
# fields sentencepiece 0.2 ignores (self_test_sample_size 0, train_extremely_large_corpus false).
LLAMA2_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "character_coverage": 0.99995,
    "max_sentencepiece_length": 16,
    "shuffle_input_sentence": True,
    "split_by_unicode_script": True,
    "split_by_whitespace": True,
    "split_by_number": True,
    "split_digits": True,
    "treat_whitespace_as_suffix": False,
    "allow_whitespace_only_pieces": True,
    "vocabulary_output_piece_score": True,
    "hard_vocab_limit": True,
    "use_all_vocab": False,
    "byte_fallback": True,
    "required_chars": "",
    "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
    "unk_piece": UNK, "bos_piece": BOS, "eos_piece": EOS, "pad_piece": "<pad>",
    "unk_surface": " \u2047 ",
    "seed_sentencepiece_size": 1_000_000,
    "shrinking_factor": 0.75,
    "num_sub_iterations": 2,
    "normalization_rule_name": "identity",  # no NFKC: text is taken as written
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
}

_CHUNK = 1 << 20


def check_corpus(files: Iterable[str | Path]) -> list[Path]:
    """The corpus files, each read through once before training starts, so that a missing file, a
    non-UTF-8 byte or a corpus with no text is named now rather than as a sentencepiece abort (or, for
    bad bytes, lines silently dropped) after minutes of loading."""
    paths = corpus_files(list(files))  # the same files as pretraining's: folders stand for their .txt/.jsonl
    has_text = False
    for path in paths:
        has_text = _check_utf8(path) or has_text
    if not has_text:
        where = paths[0] if len(paths) == 1 else f"all {len(paths)} files"
        raise LlamitaError(f"{where}: the corpus is empty (no text, only whitespace): nothing to train on")
    return paths


def _check_utf8(path: Path) -> bool:
    """Whether ``path`` holds any non-whitespace text; a LlamitaError at the first byte that is not UTF-8.
    Read in chunks: a corpus may be larger than memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    at, has_text = 0, False  # at: the file offset of the chunk being decoded
    try:
        with path.open("rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                pending = len(decoder.getstate()[0])  # bytes of a character split across chunks, decoded with this one
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    raise not_utf8(path, e, at - pending) from None
                has_text = has_text or bool(text.replace("\ufeff", "").strip())  # a BOM is not text
                if not chunk:
                    return has_text
                at += len(chunk)
    except OSError as e:
        raise LlamitaError(f"{path}: cannot be read ({e.strerror or e})") from None


def sentence_iterator(files: Iterable[Path]) -> Iterator[str]:
    """The corpus one line at a time (a leading BOM and the line ending dropped, CRLF or LF), streamed:
    sentencepiece keeps only the ``input_sentence_size`` lines it samples, not whole files."""
    for path in files:
        if path.suffix == ".jsonl":  # a "text" per line, as pretraining reads it
            yield from (line for text in documents(path) for line in text.splitlines() if line)
            continue
        with path.open(encoding="utf-8-sig") as f:  # universal newlines: "\r\n" ends a line like "\n"
            for line in f:
                if line := line.rstrip("\n"):
                    yield line


def train_tokenizer(
    files: Iterable[str | Path],
    out: str | Path,
    vocab_size: int = 32000,
    *,
    sample_sentences: int = 10_000_000,
    max_sentence_length: int = 4192,
    seed: int = 0,
    threads: int | None = None,
    verbose: bool = False,
) -> Path:
    """Train a Llama 2-style SentencePiece BPE tokenizer on text files and write it to ``out`` as a
    Hugging Face tokenizer directory (``tokenizer.model``, ``tokenizer_config.json``,
    ``special_tokens_map.json``); returns ``out``.

    ``sample_sentences``: lines sentencepiece samples from the corpus, so that a corpus larger than
    memory trains (Meta used 200M; 0: every line). ``max_sentence_length``: longer lines, in bytes,
    are skipped (Meta's 4192). ``seed`` fixes the sampling; ``threads`` defaults to every core.
    ``verbose`` shows sentencepiece's log on stderr.
    """
    if vocab_size <= SPECIAL_PIECES + BYTE_PIECES:
        raise LlamitaError(f"vocab size {vocab_size} is too small: {SPECIAL_PIECES} special and {BYTE_PIECES} "
                           "byte pieces come first, then the corpus's characters and merges")
    if sample_sentences < 0:
        raise LlamitaError(f"sample sentences {sample_sentences} is negative (0: every line)")
    if max_sentence_length < 1:
        raise LlamitaError(f"max sentence length {max_sentence_length} must be at least 1 byte")
    out = Path(out).expanduser()
    _check_out(out)
    paths = check_corpus(files)
    model = _train(paths, vocab_size, sample_sentences=sample_sentences, max_sentence_length=max_sentence_length,
                   seed=seed, threads=threads or os.cpu_count() or 1, verbose=verbose)
    _write(out, model)
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LlamitaError(f"{out}: exists and is not a directory")
    for name in ("tokenizer.json", "added_tokens.json"):  # both are read before tokenizer.model
        if (out / name).exists():
            raise LlamitaError(f"{out}: holds {name}, which would be loaded instead of the new tokenizer.model: "
                               "remove it or write to another directory")


_SP_ERROR = re.compile(r"^\w+: \S+\(\d+\) \[.*?\] ")  # "INTERNAL: src/trainer_interface.cc(744) [check] "


def _train(paths: list[Path], vocab_size: int, *, sample_sentences: int, max_sentence_length: int, seed: int,
           threads: int, verbose: bool) -> bytes:
    """The trained ``tokenizer.model`` bytes; sentencepiece's aborts as one-line LlamitaErrors."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentence_iterator(paths), model_writer=model, vocab_size=vocab_size,
            input_sentence_size=sample_sentences, max_sentence_length=max_sentence_length, num_threads=threads,
            minloglevel=0 if verbose else 2, **LLAMA2_SETTINGS)
    except RuntimeError as e:
        raise LlamitaError(_rephrase(str(e), vocab_size, max_sentence_length)) from None
    return model.getvalue()


def _rephrase(message: str, vocab_size: int, max_sentence_length: int) -> str:
    """sentencepiece's check failures, in the terms of the options we take."""
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        return (f"vocab size {vocab_size} is more than this corpus supports: at most {m[1]} pieces "
                "(give a smaller vocab size or more text)")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        need = int(m[1])
        return (f"vocab size {vocab_size} is too small for this corpus: it needs at least {need} pieces "
                f"({SPECIAL_PIECES} special, {BYTE_PIECES} byte and {need - SPECIAL_PIECES - BYTE_PIECES} characters)")
    if "!sentences_.empty()" in message:  # the corpus has text (check_corpus), so every line was too long
        return (f"every line of the corpus is longer than the max sentence length ({max_sentence_length} bytes), "
                "so none was kept: split the text into lines or raise the limit")
    return "training the tokenizer failed: " + (" ".join(_SP_ERROR.sub("", message).split()) or message.strip())


def _write(out: Path, model: bytes) -> None:
    """All files written into a temporary directory beside ``out``, then renamed into place: a crash
    never leaves a directory with a tokenizer.model and no config (or the other way round). An
    existing ``out`` keeps its other files and gets each of ours replaced atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        atomic_write(tmp / "tokenizer.model", lambda p: p.write_bytes(model))
        write_tokenizer_config(tmp, "LlamaTokenizer", bos=BOS, eos=EOS, add_bos=True, unk_token=UNK,
                               clean_up_tokenization_spaces=False)
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
        atomic_write(tmp / "special_tokens_map.json",
                     lambda p: p.write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8"))
        if out.is_dir():
            for file in sorted(tmp.iterdir()):
                os.replace(file, out / file.name)
        else:
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide the tokenizer from other users
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
