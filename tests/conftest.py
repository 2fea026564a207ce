"""Shared fixtures: the embedded default model, and transformers' load of it as the oracle."""

from __future__ import annotations

import pytest
import torch

import llamita
from llamita import assets


@pytest.fixture(scope="session")
def default_gguf():
    return assets.default_model_path()


@pytest.fixture(scope="session")
def llama_vocab():
    """Llama 2's tokenizer (llama.cpp's ggml-vocab-llama-spm.gguf), with its test vectors beside it."""
    return assets.llama_cpp_path("models/ggml-vocab-llama-spm.gguf")


@pytest.fixture(scope="session")
def llama(llama_vocab):
    from llamita.tokenizer import load_tokenizer

    return load_tokenizer(llama_vocab)


@pytest.fixture(scope="session")
def smol(default_gguf):
    from llamita.tokenizer import load_tokenizer

    return load_tokenizer(default_gguf)


@pytest.fixture(scope="session")
def hf_smol(default_gguf):
    """transformers' tokenizer built from the same GGUF."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="session")
def default_model(default_gguf):
    return llamita.load_model(default_gguf, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_default_model(default_gguf):
    """transformers' own load of the same GGUF: the reference nobody here wrote."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32)
    return model.eval()


def write_tiny_gguf(path, types: dict[str, str] | None = None, arch: str = "llama", seed: int = 0):
    """A small llama GGUF written with the gguf package's own writer; ``types`` maps tensor names
    to a GGML type whose block bytes are filled at random (so every type can be stored)."""
    import gguf
    import numpy as np

    from gguf.constants import GGML_QUANT_SIZES

    rng = np.random.default_rng(seed)
    dim, hidden, vocab, heads, kv = 256, 512, 64, 4, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_uint32(f"{arch}.context_length", 128)
    w.add_uint32(f"{arch}.embedding_length", dim)
    w.add_uint32(f"{arch}.feed_forward_length", hidden)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    shapes = {
        "token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "output.weight": (vocab, dim),
        "blk.0.attn_norm.weight": (dim,), "blk.0.ffn_norm.weight": (dim,),
        "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (dim // heads * kv, dim),
        "blk.0.attn_v.weight": (dim // heads * kv, dim), "blk.0.attn_output.weight": (dim, dim),
        "blk.0.ffn_gate.weight": (hidden, dim), "blk.0.ffn_up.weight": (hidden, dim),
        "blk.0.ffn_down.weight": (dim, hidden),
    }
    for name, shape in shapes.items():
        kind = (types or {}).get(name, "F32")
        if kind == "F32":
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
            continue
        qtype = gguf.GGMLQuantizationType[kind]
        block, nbytes = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (shape[0], shape[-1] // block * nbytes), dtype=np.uint8)
        if kind in ("F16", "BF16"):  # plain floats: keep them finite
            raw = rng.standard_normal(shape).astype(np.float16).view(np.uint8) if kind == "F16" else \
                (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def default_llm(default_model, smol):
    from llamita.llm import LLM

    return LLM(default_model, smol)
