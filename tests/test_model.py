"""The model itself: KV-cache decoding against the full forward pass, presets' sizes."""

from __future__ import annotations

import pytest
import torch

import llamita
from llamita import cli
from llamita.cache import KVCache, causal_mask


@pytest.fixture(scope="module")
def default_model_f64(default_gguf):
    """In float64 the two paths differ only by the cache logic, not by float32 matmul rounding
    (which alone moves 30-layer float32 logits by ~2e-4 between a 10-row and a 1-row matmul)."""
    return llamita.load_model(default_gguf, dtype=torch.float64)


@pytest.mark.slow
def test_incremental_decoding_equals_full_forward(default_model_f64):
    model = default_model_f64
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model, rows=2, slots=64)
        prompt = torch.arange(10).expand(2, 10)
        steps = [model(ids[:, :10], prompt, kv=cache.step(prompt, 10))]
        for t in range(10, 24):
            pos = torch.tensor([[t], [t]])
            steps.append(model(ids[:, t:t + 1], pos, mask=causal_mask(pos, t + 1), kv=cache.step(pos, t + 1)))
    assert full.abs().max() > 10
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.slow
def test_rows_at_different_positions_share_one_cache(default_model):
    """Each row of a batch writes its own positions: a row decoding alone gives the same logits."""
    vocab = default_model.config.vocab_size
    a = torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, vocab, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_a, ref_b = default_model(a)[0, -1], default_model(b)[0, -1]
        cache = KVCache(default_model, rows=2, slots=32)
        # Right-padded prefill; each row's last real token is read with logits_at.
        padded = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
        positions, last = torch.arange(9).expand(2, 9), torch.zeros(2, 9, dtype=torch.bool)
        last[0, 8] = last[1, 4] = True
        out = default_model(padded, positions, kv=cache.step(positions, 9), logits_at=last)
    assert (out[0] - ref_a).abs().max().item() < 1e-4
    assert (out[1] - ref_b).abs().max().item() < 1e-4


@pytest.mark.parametrize("name,count", [("llama-2-7b", "6,738,415,616"), ("llama-2-13b-chat", "13,015,864,320"),
                                        ("llama-2-70b", "68,976,648,192")])
def test_preset_parameter_counts_from_cli(name, count, capsys):
    """``llamita info`` in process (``python -m llamita info`` runs in test_errors.py)."""
    assert cli.main(["info", name]) == 0
    assert f"parameters:     {count}" in capsys.readouterr().out


def test_preset_values():
    c = llamita.Config.from_name("llama-2-70b")
    assert (c.n_kv_heads, c.hidden_dim, c.norm_eps, c.vocab_size, c.rope_theta, c.max_seq_len) == (
        8, 28672, 1e-5, 32000, 10000.0, 4096)
    assert llamita.Config.from_name("llama-2-7b").hidden_dim == 11008
