"""Meta's original checkpoints. The oracle is llama.cpp's own converter (convert_legacy_llama.py
from the llama-cpp-python 0.3.36 sdist) turning the same directory into GGUF, loaded by transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import llamita
from helpers import llama_cpp_path, write_meta_checkpoint


def llama_cpp_oracle(directory, tmp_path):
    """llama.cpp's converter writes GGUF; transformers loads it."""
    converter = llama_cpp_path("examples/convert_legacy_llama.py")
    out = tmp_path / "oracle.gguf"
    subprocess.run([sys.executable, str(converter), "--outtype", "f32", "--no-vocab", "--outfile", str(out),
                    str(directory)], check=True, capture_output=True)
    return AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()


PARAMS = {
    "mha": {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1},
    "gqa": {"dim": 96, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2, "multiple_of": 64, "ffn_dim_multiplier": 1.3,
            "norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128},
}


@pytest.mark.slow
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
