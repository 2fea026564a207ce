"""GGUF files: the gguf package's dequantizer and transformers' GGUF loader are the oracles."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import llamita
from llamita import layout
from conftest import write_tiny_gguf

QK = ("attn_q", "attn_k")  # stored in Meta's rotary order; llamita permutes them on load


def gguf_to_llamita_name(name: str) -> str:
    from llamita.formats.gguf import from_gguf_name

    return from_gguf_name(name, None)


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


def test_default_model_logits_match_transformers(default_model, hf_default_model):
    ids = torch.randint(0, default_model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = default_model(ids)
        expected = hf_default_model(ids).logits
    assert expected.abs().max() > 10  # real logits, not a degenerate model
    assert (got - expected).abs().max().item() < 1e-3


LISTED = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def test_every_listed_type_dequantizes_as_gguf_does(tmp_path):
    targets = ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.0.attn_v.weight",
               "blk.0.attn_output.weight", "output.weight", "token_embd.weight"]
    for i in range(0, len(LISTED), len(targets)):
        chunk = dict(zip(targets, LISTED[i:i + len(targets)]))
        path = write_tiny_gguf(tmp_path / f"t{i}.gguf", types=chunk)
        model = llamita.load_model(path, dtype=torch.float32)
        params = layout.split(model.state_dict(), model.config)
        for t in gguf.GGUFReader(path).tensors:
            if t.name in chunk:
                assert t.tensor_type.name == chunk[t.name]
                expected = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                got = params[gguf_to_llamita_name(t.name)].detach().numpy()
                np.testing.assert_array_equal(got, expected.reshape(got.shape), err_msg=chunk[t.name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_loads_in_requested_dtype(default_gguf, dtype):
    model = llamita.load_model(default_gguf, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.lm_head.weight is model.embed_tokens.weight  # tied, as the file says
