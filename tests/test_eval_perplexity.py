"""Perplexity: each convention against a computation of its own with transformers' LlamaForCausalLM
(the same GGUF loaded by transformers, the text tokenized by transformers' tokenizer), written
from each tool's definition: llama.cpp's perplexity.cpp, GPTQ's eval loop, transformers' guide."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import run_cli
from llamita import LlamitaError
from llamita.eval import evaluate

TEXT = ("The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean "
        "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd.\n\n"
        "Su lana es suave y contiene sólo una pequeña cantidad de lanolina. Las llamas pueden aprender tareas "
        "sencillas después de unas pocas repeticiones. Cuando se usan como animales de carga, pueden llevar "
        "entre el 25 y el 30 por ciento de su peso corporal durante varios kilómetros.\n\n") * 3


@pytest.fixture(scope="module")
def hf_ids(hf_smol):
    # The file's documents joined with a blank line: the text less its trailing newlines.
    ids = hf_smol(TEXT.rstrip("\n"), add_special_tokens=True)["input_ids"]  # SmolLM2 adds no BOS: none to replace
    assert hf_smol.bos_token_id not in ids[:1]
    return ids


def token_nll(model, window: list[int]) -> torch.Tensor:
    """-log p(window[t] | window[:t]) for t = 1 .. len-1, by transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([window])).logits[0].double()
    return -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(window[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.slow
def test_llamacpp_mode(text_file, hf_ids, hf_default_model, default_llm):
    ctx = 64
    nll, count = 0.0, 0
    for i in range(len(hf_ids) // ctx):  # perplexity.cpp: chunks of n_ctx, the second half's predictions
        chunk = hf_ids[i * ctx:(i + 1) * ctx]
        per_token = token_nll(hf_default_model, chunk)  # per_token[j] predicts chunk[j + 1]
        first = ctx // 2
        nll += float(per_token[first:].sum())
        count += ctx - 1 - first
    ours = evaluate("perplexity", text_file, default_llm, mode="llamacpp", ctx=ctx, batch_size=3)
    assert ours.metrics["tokens"] == count
    assert ours.metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    nbytes = ours.details["bytes"]
    assert ours.metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4)


@pytest.mark.slow
def test_gptq_mode(text_file, hf_ids, hf_default_model, default_llm):
    ctx = 96
    means = []
    for i in range(len(hf_ids) // ctx):  # GPTQ's eval: non-overlapping windows, the mean of the windows' losses
        means.append(float(token_nll(hf_default_model, hf_ids[i * ctx:(i + 1) * ctx]).mean()))
    ours = evaluate("perplexity", text_file, default_llm, mode="gptq", ctx=ctx)
    assert ours.metrics["perplexity"] == pytest.approx(math.exp(sum(means) / len(means)), rel=1e-4)
    assert ours.metrics["tokens"] == (len(hf_ids) // ctx) * (ctx - 1)


@pytest.mark.slow
def test_stride_mode(text_file, hf_ids, hf_default_model, default_llm):
    ctx, stride = 80, 32
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(hf_ids), stride):  # transformers' guide, each token scored exactly once
        end = min(begin + ctx, len(hf_ids))
        window = hf_ids[begin:end]
        new = end - max(prev_end, 1)  # the first token of the text has nothing to be predicted from
        per_token = token_nll(hf_default_model, window)
        nll += float(per_token[len(per_token) - new:].sum())
        count += new
        prev_end = end
        if end == len(hf_ids):
            break
    ours = evaluate("perplexity", text_file, default_llm, mode="stride", ctx=ctx, stride=stride)
    assert ours.metrics["tokens"] == count == len(hf_ids) - 1
    assert ours.metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


@pytest.mark.slow
def test_bits_per_byte_counts_the_whole_text(text_file, default_llm):
    """Every token but the first is scored: the bytes are the text's, less the first token's."""
    ours = evaluate("perplexity", text_file, default_llm, mode="stride", ctx=128, stride=64)
    first_token = default_llm.tokenizer.decode(default_llm.tokenizer.encode(TEXT)[:1])
    assert ours.details["bytes"] == len(TEXT.rstrip("\n").encode()) - len(first_token.encode())


def test_bad_input(tmp_path, default_llm):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(LlamitaError, match=r"empty.txt: no text"):
        evaluate("perplexity", empty, default_llm)
    short = tmp_path / "short.txt"
    short.write_text("A few words.")
    with pytest.raises(LlamitaError, match=r"short.txt: \d+ tokens, fewer than one window of --ctx 512"):
        evaluate("perplexity", short, default_llm)
    with pytest.raises(LlamitaError, match=r"--ctx 9000: must be between 2 and the model's context window \(8192\)"):
        evaluate("perplexity", short, default_llm, ctx=9000)


@pytest.mark.slow
def test_cli_writes_json(text_file, tmp_path):
    out = tmp_path / "ppl.json"
    result = run_cli("eval", "perplexity", str(text_file), "--mode", "gptq", "--ctx", "64", "--quantize", "none",
                     "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "| perplexity |" in result.stdout and "mode=gptq" in result.stdout
    import json

    data = json.loads(out.read_text())
    assert {"perplexity", "bits_per_byte", "tokens", "settings"} <= set(data)
    assert data["settings"]["mode"] == "gptq" and data["perplexity"] > 1
