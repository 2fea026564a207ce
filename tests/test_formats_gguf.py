"""GGUF files: the gguf package's dequantizer and transformers' GGUF loader are the oracles."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import llamita
from helpers import write_tiny_gguf
from llamita import layout

QK = ("attn_q", "attn_k")  # stored in Meta's rotary order; llamita permutes them on load


def gguf_to_llamita_name(name: str) -> str:
    from llamita.formats.gguf import from_gguf_name

    return from_gguf_name(name, None)


@pytest.mark.slow
def test_default_model_tensors_equal_gguf_dequantize(default_gguf, default_model, hf_default_model):
    ours = layout.split(default_model.state_dict(), default_model.config)  # the checkpoint's names
    theirs = hf_default_model.state_dict()
    reader = gguf.GGUFReader(default_gguf)
    for t in reader.tensors:
        name = gguf_to_llamita_name(t.name)
        expected = torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(
            ours[name].shape)
        if any(k in t.name for k in QK):
            # q/k rows are reordered on load (as transformers does): compare with transformers' load,
            # and check the reordering loses nothing.
            assert torch.equal(ours[name], theirs[f"model.{name}"]), name
            assert torch.equal(ours[name].sort(dim=0).values, expected.sort(dim=0).values), name
        else:
            assert torch.equal(ours[name], expected), name


@pytest.mark.slow
def test_default_model_logits_match_transformers(default_model, hf_default_model):
    ids = torch.randint(0, default_model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = default_model(ids)
        expected = hf_default_model(ids).logits
    assert expected.abs().max() > 10  # real logits, not a degenerate model
    assert (got - expected).abs().max().item() < 1e-3


LISTED = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Every 2-D tensor of the tiny model, q and k (which both loaders reorder) included.
MATRICES = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
            "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "output.weight",
            "token_embd.weight"]


@pytest.mark.parametrize("chunk", [LISTED[:len(MATRICES)], LISTED[len(MATRICES):]], ids=["first", "rest"])
def test_every_listed_type_gives_transformers_logits(tmp_path, chunk):
    """Each listed type, stored in a tiny GGUF, loaded by llamita and by transformers' GGUF loader
    (which reads every type the gguf package dequantizes, so all of LISTED; none is left out): the
    same logits. Both dequantize with gguf.quants.dequantize, so what this checks is llamita's side:
    which bytes it hands over, the shapes, q/k's row order, the names and the model. The file's
    blocks are valid ones (real quantized floats; k-quants with sane scales), so the logits are
    finite and every weight counts."""
    from transformers import AutoModelForCausalLM

    types = dict(zip(MATRICES, chunk))
    path = write_tiny_gguf(tmp_path / "t.gguf", types=types, valid_blocks=True)
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {name: stored[name] for name in types} == types
    ours = llamita.load_model(path, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(ids)
        expected = theirs(ids).logits
    assert got.shape == expected.shape == (2, 24, 64)
    assert torch.isfinite(expected).all() and expected.abs().max() > 1
    assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item(), types


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_loads_in_requested_dtype(default_gguf, dtype):
    model = llamita.load_model(default_gguf, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.lm_head.weight is model.embed_tokens.weight  # tied, as the file says


STORED = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 8, "Q5_1": 8, "Q5_K": 8, "Q6_K": 6, "Q8_0": 8}  # bits held


@pytest.mark.parametrize("qtype", STORED)
def test_each_quantized_type_runs_quantized_close_to_transformers(tmp_path, qtype):
    """A GGUF whose every matrix is ``qtype``, loaded as stored ("auto": the default), runs on quantized
    layers of the stated width, and gives transformers' logits (float32, dequantized by the gguf
    package). The layers and the embedding hold the stored codes; scales are kept in float16, exact for
    the types that store a float16 scale, rounded (2^-11 relative) for the k-quants' products. A
    prompt's rows run on the layers' PyTorch path, which this checks; the CPU kernel that decoding
    uses rounds activations to int8 as llama.cpp does, which this random model (weights of standard
    deviation 1, attention logits in the hundreds) would amplify: tests/test_quantize.py checks the
    kernel against its definition for every layout, and on the real default model."""
    from transformers import AutoModelForCausalLM

    from llamita.quantize import QuantLinear

    path = write_tiny_gguf(tmp_path / "t.gguf", types=dict.fromkeys(MATRICES, qtype), valid_blocks=True)
    ours = llamita.load_model(path, quantize="auto")
    layers = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 6 and all(m.bits == STORED[qtype] for m in layers)  # 4 in the block, output, embedding
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    for layer in layers:
        layer.kernel = False  # the PyTorch path, exact; the kernel's own checks are in test_quantize.py
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(ids)
        expected = theirs(ids).logits
    assert torch.isfinite(expected).all() and expected.abs().max() > 1
    tolerance = 3e-2 if qtype.endswith("_K") else 1e-4  # of the largest logit
    assert (got - expected).abs().max().item() < tolerance * expected.abs().max().item()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95


def test_mixed_types_in_one_fused_layer_stay_as_stored(tmp_path):
    """Q4_K_M stores q and k in Q4_K and v in Q6_K in some layers: the fused q/k/v layer runs each
    part in its own layout (k-quants as their GGUF blocks), outputs side by side, and its weights are
    gguf's dequantized values."""
    from llamita.quantize import ConcatLinear

    types = {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q4_0", "blk.0.attn_v.weight": "Q6_K"}
    path = write_tiny_gguf(tmp_path / "t.gguf", types=types, valid_blocks=True)
    ours = llamita.load_model(path, quantize="auto")
    qkv = ours.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, ConcatLinear)
    parts = [(p.blocks, p.bits, p.out_features) for p in qkv.parts]
    assert parts == [("Q4_K", 4, 256), (None, 4, 128), ("Q6_K", 6, 128)]
    float_model = llamita.load_model(path, quantize="none")
    reference = float_model.layers[0].self_attn.qkv_proj.weight  # gguf's values
    assert (qkv.dequantize() - reference).abs().max() <= 2**-10 * reference.abs().max()  # float16 scales
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for part in qkv.parts:
            part.kernel = False
        torch.testing.assert_close(qkv(x), x @ qkv.dequantize().T, atol=1e-4, rtol=1e-4)
