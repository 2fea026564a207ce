"""Pretraining from scratch: token shards give back the corpus (as sentencepiece decodes them); a tiny
model's loss falls and transformers loads the result with llamita's logits; the learning rate follows
the recipe's formula; SIGKILL + resume equals an uninterrupted run; torchrun with 2 processes equals 1
with the same global batch; bad input is one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

import llamita
from helpers import kill_at_first_checkpoint, losses, run_in_process_like, spanish_text, two_processes_and_one
from llamita import cli
from llamita.shards import tokenize_corpus
from llamita.tokenizer_train import train_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
JSONL_DOCS = ["El niño comió ñoquis en 1605.  Dos espacios,\ttabulador y un emoji: 🦙.",
              "\n Empieza con un espacio y salto de línea; termina igual.\n",
              "Segunda línea del archivo JSONL: «comillas» y acentos — áéíóú ÁÉÍÓÚ ü."]
VOCAB = 600


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of two documents kinds: a .txt file (one document) and a .jsonl file (one per line)."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_bytes(spanish_text(120_000).replace("\n", "\r\n").encode())  # \r\n kept as it is
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in JSONL_DOCS), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory) -> Path:
    return train_tokenizer([corpus], tmp_path_factory.mktemp("tok"), vocab_size=VOCAB)  # a folder: .txt and .jsonl


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A tiny Llama (grouped-query attention) as an HF config.json."""
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "tie_word_embeddings": False}))
    return path


@pytest.fixture(scope="module")
def run(config, corpus, tok, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    llamita.pretrain(config, corpus, tok, out, steps=40, warmup=4, seq_len=32, batch_size=8, lr=3e-3,
                     eval_every=20, progress=False)
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_shards_decode_back_to_the_corpus(corpus, tok, tmp_path):
    folder = tokenize_corpus([corpus], tok, tmp_path / "tokens", progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["documents"] == 1 + len(JSONL_DOCS)
    stream = np.concatenate([np.fromfile(folder / s["file"], dtype=np.uint16) for s in manifest["shards"]]).tolist()
    sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    documents = [(corpus / "a.txt").read_bytes().decode(), *JSONL_DOCS]  # as it is: \r\n kept
    starts = [i for i, t in enumerate(stream) if t == sp.bos_id()]
    ends = [i for i, t in enumerate(stream) if t == sp.eos_id()]
    assert len(starts) == len(ends) == len(documents) and starts[0] == 0 and ends[-1] == len(stream) - 1
    for doc, start, end in zip(documents, starts, ends):
        assert stream[start + 1: end] == sp.encode(doc)
        assert sp.decode(stream[start + 1: end]) == doc  # the corpus, exactly
    before = (folder / "manifest.json").stat().st_mtime_ns
    assert tokenize_corpus([corpus], tok, folder, progress=False) == folder  # the same corpus: reused
    assert (folder / "manifest.json").stat().st_mtime_ns == before


def test_loss_falls_and_transformers_loads_the_model(run):
    rows = metrics(run)
    loss = [r["loss"] for r in rows]
    assert len(loss) == 40 and np.mean(loss[-5:]) < np.mean(loss[:5]) - 1.0
    evals = [r["step"] for r in rows if "eval_loss" in r]
    assert evals == [20, 40] and rows[-1]["eval_loss"] < rows[19]["eval_loss"]
    assert all(r["tok_s"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    model = run / "model"
    ours = llamita.load_model(model, dtype=torch.float32)
    theirs = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-5
    text = "En un lugar de la Mancha, de cuyo nombre no quiero acordarme"
    ids = llamita.load_tokenizer(model).encode(text, bos=True)
    assert AutoTokenizer.from_pretrained(model)(text)["input_ids"] == ids
    greedy = theirs.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    ours_text = llamita.LLM.load(model).generate(text, max_new_tokens=6, temperature=0.0)
    assert ours_text == llamita.load_tokenizer(model).decode(greedy, special=False)


def test_the_learning_rate_follows_the_recipe(run):
    """Linear warmup to the peak, then cosine to a tenth of it at the last step (Llama 2, section 2.2)."""
    peak, warmup, total = 3e-3, 4, 40
    for row in metrics(run):
        s = row["step"] - 1
        if s < warmup:
            want = peak * (s + 1) / warmup
        else:
            want = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - 1 - warmup))))
        assert row["lr"] == pytest.approx(want, rel=1e-12)
    assert metrics(run)[-1]["lr"] == pytest.approx(peak / 10)


def test_init_follows_llama2c(config, tmp_path):
    """std 0.02, residual outputs 0.02 / sqrt(2 x layers), norm gains 1."""
    from llamita.pretraining import init_weights, model_config

    torch.manual_seed(0)
    model = llamita.Llama(model_config(config, VOCAB))
    init_weights(model)
    w = dict(model.named_parameters())
    assert w["layers.0.self_attn.qkv_proj.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert w["layers.1.mlp.down_proj.weight"].std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert w["layers.1.self_attn.o_proj.weight"].std().item() == pytest.approx(0.02 / 2, rel=0.1)
    assert torch.equal(w["norm.weight"], torch.ones(64))


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(config, corpus, tok, tmp_path):
    args = [sys.executable, "-m", "llamita", "pretrain", "--config", str(config), "--data", str(corpus),
            "--tokenizer", str(tok), "--steps", "16", "--seq-len", "32", "--batch-size", "4", "--batch-tokens", "256",
            "--save-every", "5", "--lr", "3e-3", "--no-progress"]
    run_in_process_like(args, tmp_path / "whole")
    cut = tmp_path / "cut"
    kill_at_first_checkpoint(args, cut, ENV)
    assert not (cut / "model").exists()
    subprocess.run(args + ["--out", str(cut), "--resume"], env=ENV, check=True, capture_output=True)
    assert losses(cut) == losses(tmp_path / "whole")  # exactly, step by step
    a, b = (load_file(run / "model" / "model.safetensors") for run in (cut, tmp_path / "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_with_the_same_global_batch(config, corpus, tok, tmp_path):
    tokens = tmp_path / "tokens"  # shards made once (as on another machine), read by both runs
    assert cli.main(["tokenizer", "encode", str(corpus), "--tokenizer", str(tok), "--out", str(tokens)]) == 0
    common = ["pretrain", "--config", str(config), "--data", str(tokens), "--tokenizer", str(tok), "--steps", "3",
              "--seq-len", "32", "--batch-tokens", "256", "--lr", "3e-3", "--no-progress"]
    two, one = two_processes_and_one(common, tmp_path, ENV)
    assert len(two) == 3 and two == pytest.approx(one, abs=1e-5)
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("ddp", "one"))
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


def test_bad_input_is_one_line(config, corpus, tok, tmp_path, capsys):
    def error(*args: str) -> str:
        assert cli.main(["pretrain", "--config", str(config), "--tokenizer", str(tok), "--no-progress",
                         "--out", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        return err

    (tmp_path / "empty.txt").write_text("")
    assert "holds no text" in error("--data", str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("años de ".encode() + "niño".encode("latin-1"))
    latin1 = str(tmp_path / "latin1.txt")
    assert f"{latin1}: not UTF-8 text: byte 0xF1 at byte offset 11" in error("--data", latin1)
    (tmp_path / "bad.jsonl").write_text('{"text": "hola"}\n{"texto": "adiós"}\n')
    assert f'{tmp_path / "bad.jsonl"}, line 2: expected an object with a "text" string' in error(
        "--data", str(tmp_path / "bad.jsonl"))
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 100}))
    assert f"vocab_size 100 is smaller than the tokenizer's {VOCAB} pieces" in error(
        "--data", str(corpus), "--config", str(small))
    (tmp_path / "short.txt").write_text("Un documento corto.")
    assert "too few to train on" in error("--data", str(tmp_path / "short.txt"), "--seq-len", "64")
    assert "longer than the model's context (128 tokens)" in error("--data", str(corpus), "--seq-len", "129")
    assert "neither a preset" in error("--data", str(corpus), "--config", "llama-3-8b")
    assert "no such file or folder" in error("--data", str(tmp_path / "missing.txt"))
