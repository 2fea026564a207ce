"""`llamita tokenizer train`: a Llama 2-style SentencePiece BPE tokenizer, trained on 300 KB of
Spanish prose, that sentencepiece, transformers and llamita encode alike, trained with Meta's settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sentencepiece as spm
from google.protobuf import text_format
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from helpers import spanish_text
from llamita import tokenizer_train
from llamita.cli import main
from llamita.errors import LlamitaError
from llamita.tokenizer import load_tokenizer
from llamita.tokenizer_train import train_tokenizer

META_SPEC = Path(__file__).parent / "data" / "llama2_tokenizer_spec.txt"
VOCAB = 1500
FILES = {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
# Accents, ñ, digits, a run of spaces, a newline and a tab, and characters the corpus never has (an emoji,
# CJK), which only byte fallback can encode. It starts with a letter: for text that starts with a space,
# transformers 5's LlamaTokenizer (tokenizers' Metaspace) adds no dummy prefix where sentencepiece adds
# one -- the same for Meta's own Llama 2 tokenizer, so not a property of what we train.
TEXT = ("En un lugar de la Mancha, de cuyo nombre no quiero acordarme,  no ha mucho tiempo (1605)\n"
        "que vivía un hidalgo: ¡Señor! ¿Año de 1615?\tÑandú 🦙 漢字   fin.")


def corpus(directory: Path) -> Path:
    """300 KB of Spanish prose (tests/helpers.py: real and made-up words, accents, years, punctuation)."""
    path = directory / "espanol.txt"
    path.write_text(spanish_text(300_000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("toktrain")
    return train_tokenizer([corpus(tmp)], tmp / "tok", VOCAB, threads=1)


def proto(out: Path) -> sp_pb2.ModelProto:
    return sp_pb2.ModelProto.FromString((out / "tokenizer.model").read_bytes())


def test_sentencepiece_transformers_and_llamita_encode_alike(trained: Path):
    """All with BOS: transformers adds it by default (add_bos_token), sp and llamita are asked to."""
    from transformers import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast

    assert {p.name for p in trained.iterdir()} == FILES  # no tokenizer.json: transformers converts the .model
    sp = spm.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    expected = sp.encode(TEXT, add_bos=True)
    pieces = [sp.id_to_piece(i) for i in expected]
    assert "<0xF0>" in pieces  # the emoji, as its UTF-8 bytes
    assert not [p for p in pieces if re.search(r"\d\d", p) and not p.startswith("<0x")]  # digits one by one
    assert load_tokenizer(trained).encode(TEXT, bos=True) == expected
    for cls in (LlamaTokenizer, LlamaTokenizerFast, AutoTokenizer):  # one class in transformers 5, kept apart in 4
        tok = cls.from_pretrained(trained)
        assert tok(TEXT)["input_ids"] == expected, cls.__name__
        assert tok.decode(expected, skip_special_tokens=True) == TEXT


def test_trainer_spec_is_llama2s(trained: Path):
    meta = text_format.Parse(META_SPEC.read_text(encoding="utf-8"), sp_pb2.ModelProto())
    ours = proto(trained)
    assert meta.trainer_spec.vocab_size == 32000 and ours.trainer_spec.vocab_size == VOCAB == len(ours.pieces)
    for field in ("model_type", "byte_fallback", "split_digits", "allow_whitespace_only_pieces",
                  "split_by_unicode_script", "split_by_number", "split_by_whitespace", "treat_whitespace_as_suffix",
                  "max_sentencepiece_length", "max_sentence_length", "shuffle_input_sentence", "hard_vocab_limit",
                  "vocabulary_output_piece_score", "use_all_vocab", "required_chars", "unk_id", "bos_id", "eos_id",
                  "pad_id", "unk_piece", "bos_piece", "eos_piece", "pad_piece", "unk_surface",
                  "seed_sentencepiece_size", "shrinking_factor", "num_sub_iterations"):
        assert getattr(ours.trainer_spec, field) == getattr(meta.trainer_spec, field), field
    assert ours.trainer_spec.character_coverage == pytest.approx(meta.trainer_spec.character_coverage)
    assert meta.trainer_spec.unk_surface == " \u2047 "
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces", "precompiled_charsmap"):
        assert getattr(ours.normalizer_spec, field) == getattr(meta.normalizer_spec, field), field
    assert ours.normalizer_spec.name == "identity"
    assert ours.pieces[3].piece == "<0x00>" and ours.pieces[258].piece == "<0xFF>"  # Llama 2's layout of ids


def test_load_tokenizer_round_trips(trained: Path):
    tok = load_tokenizer(trained)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == ("sentencepiece", 1, 2, True, VOCAB)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    sample = (trained.parent / "espanol.txt").read_text(encoding="utf-8")[20_000:30_000]
    assert tok.decode(tok.encode(sample)) == sample


def test_cli_trains_the_same_tokenizer_and_replaces_it(trained: Path, tmp_path: Path, capsys):
    out = tmp_path / "tok"
    args = ["tokenizer", "train", str(trained.parent / "espanol.txt"), "--out", str(out)]
    assert main([*args, "--vocab-size", str(VOCAB)]) == 0
    assert capsys.readouterr() == (f"{out}\n", "")  # sentencepiece's log stays quiet
    assert proto(out).pieces == proto(trained).pieces  # the same seed (the specs differ in num_threads)
    assert main([*args, "--vocab-size", "1200", "--sample-sentences", "2000"]) == 0  # into the same directory
    assert len(proto(out).pieces) == 1200 and proto(out).trainer_spec.input_sentence_size == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"] and {p.name for p in out.iterdir()} == FILES


def bad_corpus(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """CLI arguments for a bad input, and a pattern its error must match."""
    if case == "missing":
        return [str(tmp_path / "absent.txt")], r"absent\.txt: no such file or folder"
    if case == "empty":
        (tmp_path / "empty.txt").write_text(" \n\n\t\n")
        return [str(tmp_path / "empty.txt")], r"empty\.txt: the corpus is empty"
    if case == "latin1":
        (tmp_path / "ok.txt").write_text("hola\n")
        (tmp_path / "latin1.txt").write_bytes("Érase una vez\n".encode() + "año".encode("latin-1"))
        return ([str(tmp_path / "ok.txt"), str(tmp_path / "latin1.txt")],
                r"latin1\.txt: not UTF-8.* 0xF1 at byte offset 16")
    if case == "vocab-too-large":
        (tmp_path / "small.txt").write_text("hola mundo\n" * 3)
        return [str(tmp_path / "small.txt"), "--vocab-size", "400"], r"vocab size 400 is more .* at most \d+ pieces"
    if case == "vocab-too-small":
        return [str(corpus(tmp_path)), "--vocab-size", "300"], r"vocab size 300 is too small .* at least \d+ pieces"
    if case == "lines-too-long":
        (tmp_path / "long.txt").write_text("palabra " * 600)
        return [str(tmp_path / "long.txt"), "--max-sentence-length", "4192"], r"every line .* \(4192 bytes\)"
    assert case == "vocab-below-bytes"
    (tmp_path / "small.txt").write_text("hola\n")
    return [str(tmp_path / "small.txt"), "--vocab-size", "200"], r"vocab size 200 is too small: 3 special and 256 byte"


@pytest.mark.parametrize("case", ["missing", "empty", "latin1", "vocab-too-large", "vocab-too-small",
                                  "lines-too-long", "vocab-below-bytes"])
def test_bad_input_is_a_one_line_error(tmp_path: Path, capsys, case: str):
    args, pattern = bad_corpus(tmp_path, case)
    out = tmp_path / "out"
    assert main(["tokenizer", "train", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamita: error:") and err.count("\n") == 1 and re.search(pattern, err), err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_bad_byte_offset_across_chunks(tmp_path: Path, monkeypatch):
    """The offset counts the bytes of a character that began in the previous chunk."""
    monkeypatch.setattr(tokenizer_train, "_CHUNK", 8)
    good = tmp_path / "good.txt"
    good.write_bytes("abcdefgñ ñandú 🦙\n".encode())  # ñ and the emoji straddle chunk ends
    assert tokenizer_train.check_corpus([good]) == [good]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abcdefg\xc3(" + b"x" * 20)  # a lead byte ending chunk 1, no continuation byte after it
    with pytest.raises(LlamitaError, match=r"bad\.txt: not UTF-8 text: byte 0xC3 at byte offset 7 "):
        tokenizer_train.check_corpus([bad])
    cut = tmp_path / "cut.txt"
    cut.write_bytes(b"abc\xe2\x82")  # the file ends inside a character
    with pytest.raises(LlamitaError, match=r"byte 0xE2 at byte offset 3 "):
        tokenizer_train.check_corpus([cut])
    with pytest.raises(LlamitaError, match="no corpus files"):
        tokenizer_train.check_corpus([])
