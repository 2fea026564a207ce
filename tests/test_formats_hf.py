"""Hugging Face checkpoints: transformers' LlamaForCausalLM is the oracle."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import llamita
from helpers import CONFIGS, random_tokens, tiny_hf


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "legacy-bin"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name, layout):
    ref = tiny_hf(list(CONFIGS).index(name), **CONFIGS[name])  # a constant seed (str hashes vary by process)
    if layout.endswith("bin"):  # transformers 5 writes only safetensors: write the legacy layout by hand
        ref.config.save_pretrained(tmp_path)
        # legacy-bin: torch.save's format before torch 1.6 (not a zip), which torch cannot memory-map
        torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin",
                   _use_new_zipfile_serialization=layout == "bin")
    else:
        ref.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if layout == "sharded" else {}))
    files = sorted(p.name for p in tmp_path.iterdir())
    if layout == "sharded":
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1
    if layout.endswith("bin"):
        assert any(f.startswith("pytorch_model") for f in files)
    model = llamita.load_model(tmp_path, dtype=torch.float32)
    ids = random_tokens(ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == (2, 17, ref.config.vocab_size)
    assert (got - expected).abs().max().item() < 1e-4


def test_config_fields_honoured(tmp_path):
    ref = tiny_hf(3, **CONFIGS["9q-3kv"], rope_theta=5e5, max_position_embeddings=96)
    ref.save_pretrained(tmp_path)
    c = llamita.load_model(tmp_path).config
    assert (c.n_heads, c.n_kv_heads, c.rope_theta, c.norm_eps, c.tie_embeddings, c.max_seq_len) == (
        9, 3, 5e5, 1e-5, True, 96)


def test_round_trip_save_model(tmp_path):
    ref = tiny_hf(5, **CONFIGS["gqa-tied"])
    ref.save_pretrained(tmp_path / "in")
    model = llamita.load_model(tmp_path / "in", dtype=torch.float32)
    llamita.save_model(model, tmp_path / "out")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_tokens(ref.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_save_model_shards_with_index(tmp_path):
    ref = tiny_hf(6, **CONFIGS["multi-head-untied"])
    ref.save_pretrained(tmp_path / "in")
    model = llamita.load_model(tmp_path / "in", dtype=torch.float32)
    llamita.save_model(model, tmp_path / "out", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = random_tokens(ref.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(tmp_path, dtype):
    ref = tiny_hf(7, **CONFIGS["gqa-tied"])
    ref.save_pretrained(tmp_path)
    model = llamita.load_model(tmp_path, dtype=dtype)
    assert model.embed_tokens.weight.dtype == dtype
    ids = random_tokens(ref.config.vocab_size)
    with torch.no_grad():
        got = model(ids)
        expected = ref(ids).logits
    assert got.dtype == dtype
    assert (got.float() - expected).abs().max().item() < 0.1 * expected.abs().max().item()
