"""Tensor parallel (llamita.parallel): 2 processes under torchrun (gloo, CPU) give the logits and
greedy text of one process, for HF safetensors and Meta two-shard checkpoints, each rank reading
and holding about half the weights; bad input fails in one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import llamita
from helpers import running_server, tiny_base, tiny_hf, write_meta_checkpoint
from llamita import cli, layout
from llamita.errors import LlamitaError

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{Path(__file__).parent}"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
PROMPT = "gato casa pescado"
IDS = list(range(1, 18))
CHAT = ["chat", "--temperature", "0", "--max-new-tokens", "8"]
CHAT_STDIN = "gato\ncasa perro\n"
# Big enough that a rank holding every weight (105 MB of float32) shows far above half of them.
BIG = {"dim": 768, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 256, "norm_eps": 1e-5}

# Each rank loads each model with its slice only, measures how much its memory grew while loading (its peak, reset
# before each load), then runs the prompt's logits and a greedy reply; rank 0 writes them all. Then both run
# `llamita chat --tp 2` in the same processes, on the stdin that torchrun's children share.
WORKER = """
import gc, json, sys
import torch
import llamita
from llamita import cli, parallel
from llamita.cache import KVCache
from llamita.formats import load_model, read_checkpoint

def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

out, jobs = sys.argv[1], json.loads(sys.argv[2])
results = {}
for name, (model_dir, tokenizer_dir, ids, quantize) in jobs.items():
    tp = parallel.start(2, "cpu", read_checkpoint(model_dir).config)
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM back to the current resident size
    before = status("VmRSS")
    model = load_model(model_dir, shard=tp, quantize=quantize)
    grew = status("VmHWM") - before
    held = sum(t.numel() * t.element_size() for t in model.parameters())
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0]
    text = None
    if tokenizer_dir:
        llm = llamita.LLM(model, llamita.load_tokenizer(tokenizer_dir))
        llm.shard = tp
        text = llm.generate(sys.argv[3], temperature=0, max_new_tokens=12)
    memory = [None, None]
    torch.distributed.all_gather_object(memory, {"grew": grew, "held": held})
    kv_heads = KVCache(model, 1, 4).k[0].shape[1]
    results[name] = {"logits": logits.tolist(), "text": text, "memory": memory, "kv_heads": kv_heads}
    del model, logits
if tp.rank == 0:
    open(out, "w").write(json.dumps(results))
sys.exit(cli.main(json.loads(sys.argv[4])))
"""


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.parameters())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path | None]]:
    """(checkpoint, tokenizer) by name: a 105 MB Meta checkpoint with GQA in 2 shards, the same weights
    in HF's safetensors, a tiny HF model with a tied output layer and an odd vocabulary (not divisible by
    2), and a small one for the CLI."""
    root = tmp_path_factory.mktemp("tp")
    small = tiny_base(root / "small", num_attention_heads=4, num_key_value_heads=2)
    vocab = json.loads((small / "config.json").read_text())["vocab_size"]
    meta = root / "meta"
    meta.mkdir()
    write_meta_checkpoint(meta, BIG, vocab=vocab, n_shards=2)
    llamita.save_model(llamita.load_model(meta), root / "hf")
    odd = root / "odd"
    tiny_hf(3, vocab_size=vocab + 1, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
            tie_word_embeddings=True).save_pretrained(odd)
    # The tiny model first: its load pays the one-time costs (imports, allocator pools) before the big ones.
    return {"tied-odd-vocab": (odd, None), "hf": (root / "hf", small), "meta": (meta, small), "small": (small, small)}


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory) -> dict:
    """The worker's results from one torchrun launch of 2 processes."""
    out = tmp_path_factory.mktemp("tp-out") / "results.json"
    jobs = {name: (str(model), str(tok) if tok else None, IDS, "none") for name, (model, tok) in checkpoints.items()
            if name != "small"}
    jobs["meta-int8"] = (str(checkpoints["meta"][0]), None, IDS, "int8")
    script = out.parent / "worker.py"
    script.write_text(WORKER)
    chat = [*CHAT, "--model", str(checkpoints["small"][0]), "--tp", "2"]
    run = subprocess.run([*TORCHRUN, str(script), str(out), json.dumps(jobs), PROMPT, json.dumps(chat)], env=ENV,
                         capture_output=True, text=True, timeout=180, cwd=ROOT, input=CHAT_STDIN)
    assert run.returncode == 0, run.stderr[-3000:]
    return {**json.loads(out.read_text()), "chat": run.stdout}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf", "tied-odd-vocab", "meta"])
def test_two_ranks_give_the_logits_and_greedy_text_of_one_process(checkpoints, two_ranks, name):
    model_dir, tokenizer_dir = checkpoints[name]
    model = llamita.load_model(model_dir)
    with torch.inference_mode():
        expected = model(torch.tensor([IDS]))[0]
    got = torch.tensor(two_ranks[name]["logits"])
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-5, ((got - expected).abs().max(), expected.std())
    assert expected.std() > 0.1  # logits that differ from token to token: a wrong slice would show
    assert two_ranks[name]["kv_heads"] * 2 == model.config.n_kv_heads  # each rank caches its half of the kv heads
    if tokenizer_dir is not None:
        text = llamita.LLM(model, llamita.load_tokenizer(tokenizer_dir)).generate(PROMPT, temperature=0,
                                                                                  max_new_tokens=12)
        assert two_ranks[name]["text"] == text and text


@pytest.mark.slow
def test_int8_ranks_quantize_their_slices(checkpoints, two_ranks):
    """Each rank quantizes its own slices (and its part of the output layer): the logits of one int8
    process up to the activations' quantization, which is per slice here (per row of the whole there)."""
    model = llamita.load_model(checkpoints["meta"][0], quantize="int8")
    assert type(model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    with torch.inference_mode():
        expected = model(torch.tensor([IDS]))[0]
    got = torch.tensor(two_ranks["meta-int8"]["logits"])
    assert (got - expected).abs().max() < 0.02 * expected.std()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf", "meta"])
def test_each_rank_reads_and_holds_about_half_the_weights(checkpoints, two_ranks, name):
    whole = weight_bytes(llamita.load_model(checkpoints[name][0]))
    assert whole > 100e6
    for rank in two_ranks[name]["memory"]:
        assert 0.45 * whole <= rank["held"] <= 0.55 * whole, (rank, whole)
        # Its half (measured: 0.53 of the whole from safetensors), plus, from Meta's memory-mapped file, its pages
        # beside the fused q/k/v and gate/up copies while loading (0.66); a rank that read every weight would grow
        # by all of them at least.
        assert rank["grew"] < {"hf": 0.6, "meta": 0.8}[name] * whole, (rank, whole)


@pytest.mark.slow
def test_chat_under_torchrun_prints_once_what_one_process_prints(checkpoints, two_ranks, capsys, monkeypatch):
    """Rank 0 reads stdin (a piped chat, one message a line) and prints; the other rank follows it."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(CHAT_STDIN))
    assert cli.main([*CHAT, "--model", str(checkpoints["small"][0])]) == 0
    one = capsys.readouterr().out
    assert len(one.splitlines()) == 2 and two_ranks["chat"] == one


def test_shards_are_torch_chunks_and_cover_every_row():
    for size in (211, 8, 3):
        pieces = [layout.shard_range(size, r, 2) for r in range(2)]
        assert [hi - lo for lo, hi in pieces] == [len(c) for c in torch.arange(size).chunk(2)]
    w = torch.arange(24.0).view(4, 6)
    # o_proj is split by input features (columns), q_proj by output features (rows)
    assert torch.equal(layout.take_shard("layers.0.self_attn.o_proj.weight", [w[:, :3], w[:, 3:]], 1, 2), w[:, 3:])
    assert torch.equal(layout.take_shard("layers.0.self_attn.q_proj.weight", [w], 1, 2), w[2:])
    assert torch.equal(layout.take_shard("layers.0.self_attn.o_proj.weight", [w[:, :2], w[:, 2:]], 0, 2), w[:, :3])


def test_tp_not_dividing_the_heads_is_one_line(tmp_path, capsys):
    model = tiny_base(tmp_path / "m", hidden_size=72, num_attention_heads=9, num_key_value_heads=3)
    capsys.readouterr()  # transformers' progress bars
    assert cli.main(["generate", "--model", str(model), "--tp", "2", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "llamita: error: --tp 2 must divide the model's 9 attention heads and 3 kv heads"


def test_tp_without_torchrun_says_how_to_launch(tmp_path, capsys):
    model = tiny_base(tmp_path / "m", num_attention_heads=4, num_key_value_heads=2)
    capsys.readouterr()
    assert cli.main(["chat", "--model", str(model), "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llamita: error: --tp 2 runs one process per rank: launch it with `torchrun "
                          "--nproc-per-node 2 -m llamita") and len(err.splitlines()) == 1
    with pytest.raises(LlamitaError, match="torchrun"):
        llamita.LLM.load(model, tp=2)


def test_tp_other_than_the_number_of_processes(tmp_path, monkeypatch):
    model = tiny_base(tmp_path / "m", num_attention_heads=4, num_key_value_heads=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(LlamitaError, match="^--tp 2, but torchrun started 4 processes: give --nproc-per-node 2$"):
        llamita.LLM.load(model, tp=2)


@pytest.mark.slow
def test_serve_under_torchrun_answers_as_one_process(checkpoints):
    """Rank 0 answers HTTP and tells rank 1 each pass: concurrent requests (batched), one that reuses
    a cached prompt, and a chat reply come out as one process decodes them."""
    model = checkpoints["small"][0]
    llm = llamita.LLM.load(model, quantize="none")
    prompts = ["El gato negro", "Once upon a time", "La casa de la colina", "El gato negro"]
    want = [llm.generate(p, max_new_tokens=12, temperature=0) for p in prompts]
    messages = [{"role": "user", "content": "Hola, ¿qué tal?"}]
    want_chat = llm.chat(messages, max_new_tokens=10, temperature=0)
    with running_server("--model", str(model), tp=2) as url:
        def complete(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
            return httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(complete, prompts[:3]))
        got.append(complete(prompts[3]))  # its prompt is in the cache now: only the rest runs
        body = {"messages": messages, "max_tokens": 10, "temperature": 0}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        metrics = httpx.get(f"{url}/metrics").text
    assert got == want
    assert reply["choices"][0]["message"]["content"] == want_chat
    assert "llamita_prompt_tokens_cached_total 0" not in metrics
