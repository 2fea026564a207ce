"""Meta's original checkpoints. The oracle is llama.cpp's own converter (convert_legacy_llama.py
from the llama-cpp-python 0.3.36 sdist) turning the same directory into GGUF, loaded by transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import llamita
from llamita import assets

# Meta's model-parallel split rules: which dim each weight is cut along (None: replicated).
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "attention_norm": None, "ffn_norm": None}


def write_meta_checkpoint(directory, params: dict, vocab: int, n_shards: int, seed: int = 0) -> None:
    """A random checkpoint with Meta's tensor names, cut into ``n_shards`` as Meta's code cuts it."""
    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    kv_dim = dim // n_heads * params.get("n_kv_heads", n_heads)
    hidden = llamita.Config(dim=dim, n_heads=n_heads, multiple_of=params["multiple_of"],
                            ffn_dim_multiplier=params.get("ffn_dim_multiplier")).hidden_dim
    full = {"tok_embeddings.weight": (torch.randn(vocab, dim, generator=g), 1),
            "norm.weight": (torch.rand(dim, generator=g) + 0.5, None),
            "output.weight": (torch.randn(vocab, dim, generator=g) * 0.05, 0),
            "rope.freqs": (torch.rand(dim // n_heads // 2, generator=g), None)}
    shapes = {"wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
              "w1": (hidden, dim), "w3": (hidden, dim), "w2": (dim, hidden)}
    for i in range(params["n_layers"]):
        for name, shape in shapes.items():
            part = "attention" if name.startswith("w") and name[1] in "qkvo" else "feed_forward"
            full[f"layers.{i}.{part}.{name}.weight"] = (torch.randn(*shape, generator=g) * 0.1, SPLIT[name])
        for name in ("attention_norm", "ffn_norm"):
            full[f"layers.{i}.{name}.weight"] = (torch.rand(dim, generator=g) + 0.5, None)
    for rank in range(n_shards):
        shard = {k: (t if d is None else t.chunk(n_shards, dim=d)[rank]).clone()
                 for k, (t, d) in full.items()}
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))


def llama_cpp_oracle(directory, tmp_path):
    """llama.cpp's converter writes GGUF; transformers loads it."""
    converter = assets.llama_cpp_path("examples/convert_legacy_llama.py")
    out = tmp_path / "oracle.gguf"
    subprocess.run([sys.executable, str(converter), "--outtype", "f32", "--no-vocab", "--outfile", str(out),
                    str(directory)], check=True, capture_output=True)
    return AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()


PARAMS = {
    "mha": {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1},
    "gqa": {"dim": 96, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2, "multiple_of": 64, "ffn_dim_multiplier": 1.3,
            "norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128},
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_two_shards_match_llama_cpp_converter(tmp_path, name):
    ckpt = tmp_path / "meta"
    ckpt.mkdir()
    write_meta_checkpoint(ckpt, PARAMS[name], vocab=128, n_shards=2)
    model = llamita.load_model(ckpt, dtype=torch.float32)
    assert model.config.vocab_size == 128  # resolved from the weights when params.json says -1
    oracle = llama_cpp_oracle(ckpt, tmp_path)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = oracle(ids).logits
        got = model(ids)
    assert (got - expected).abs().max().item() < 1e-4
