"""``llamita convert``: checkpoints written as GGUF (f16, q8_0, q4_0) or in the Hugging Face layout.

The oracles are others' code: the gguf package reads the files back (names, types, shapes,
metadata, and dequantizes the blocks), transformers loads them (its GGUF loader dequantizes and
undoes GGUF's q/k row order itself) and its own load of the source gives the reference logits and
tokens, and llama.cpp's converter (convert_legacy_llama.py) writes the same Meta checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import llamita
from helpers import llama_cpp_path, run_cli, tiny_base, write_meta_checkpoint
from llamita.cli import main

# GGUF's per-block tensor names (llama.cpp's) -> transformers' LlamaForCausalLM module names
HF_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
HF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
TEXT = ("The capital of France is Paris. The capital of Germany is Berlin. Water boils at one hundred degrees "
        "Celsius at sea level, and it freezes at zero degrees. The quick brown fox jumps over the lazy dog.")
CHAT = "<|im_start|>user\nrepite gato casa pescado grande<|im_end|>\n below is  an instruction"


def hf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    module = f"model.layers.{parts[1]}.{HF_BLOCK[parts[2]]}" if parts[0] == "blk" else HF_TOP[base]
    return f"{module}.{suffix}"


def expected_names(n_layers: int, tied: bool) -> set[str]:
    """The tensor names llama.cpp's llama architecture has, from the gguf package's own tables."""
    M, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    block = [M.ATTN_NORM, M.ATTN_Q, M.ATTN_K, M.ATTN_V, M.ATTN_OUT, M.FFN_NORM, M.FFN_GATE, M.FFN_UP, M.FFN_DOWN]
    top = [M.TOKEN_EMBD, M.OUTPUT_NORM] + ([] if tied else [M.OUTPUT])
    return {f"{names[t]}.weight" for t in top} | {f"{names[t].format(bid=i)}.weight" for i in range(n_layers)
                                                   for t in block}


def expected_type(name: str, shape: tuple[int, ...], kind: str, tied: bool) -> str:
    """Norms F32; matrices the file's type, F16 where rows are not whole 32-blocks; in q4_0 the output
    matrix (the embedding when tied) Q8_0."""
    if len(shape) == 1:
        return "F32"
    if kind == "f16" or shape[-1] % 32:
        return "F16"
    if kind == "q4_0" and (name == "output.weight" or tied and name == "token_embd.weight"):
        return "Q8_0"
    return kind.upper()


def check_tensors(reader: gguf.GGUFReader, reference: torch.nn.Module, kind: str) -> dict[str, gguf.ReaderTensor]:
    """Names, types and shapes of every tensor against the reference model's weights."""
    cfg = reference.config
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected_names(cfg.num_hidden_layers, cfg.tie_word_embeddings)
    state = reference.state_dict()
    for name, t in tensors.items():
        shape = tuple(state[hf_name(name)].shape)
        assert tuple(int(s) for s in reversed(t.shape)) == shape, name  # GGUF lists dimensions innermost first
        assert t.tensor_type.name == expected_type(name, shape, kind, cfg.tie_word_embeddings), name
    return tensors


def check_metadata(reader: gguf.GGUFReader, cfg) -> None:
    """The llama.* keys llama.cpp reads, against transformers' config of the source."""
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.", "llama."))}
    expected = {"general.architecture": "llama", "llama.block_count": cfg.num_hidden_layers,
                "llama.embedding_length": cfg.hidden_size, "llama.feed_forward_length": cfg.intermediate_size,
                "llama.attention.head_count": cfg.num_attention_heads,
                "llama.attention.head_count_kv": cfg.num_key_value_heads,
                "llama.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
                "llama.context_length": cfg.max_position_embeddings, "llama.vocab_size": cfg.vocab_size}
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_parameters["rope_theta"], rel=1e-6)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def load_gguf(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


# -- a tiny random Hugging Face checkpoint ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny_base: untied, 2 of 4 heads for k/v, SwiGLU width 88 (ffn_down's rows are not whole blocks),
    a byte-level BPE tokenizer with special tokens and a chat template."""
    path = tiny_base(tmp_path_factory.mktemp("tiny") / "hf")
    return path, LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# A block of 32 weights stores codes q and one float16 scale d: each weight is off by at most the
# rounding of its code (d/2; a whole d for Q4_0's one clamped code) plus q times the scale's rounding
# (d * 2**-11). (d as a fraction of the block's largest magnitude, the largest code, the rounding.)
BLOCK = {"Q8_0": (1 / 127, 127, 0.5), "Q4_0": (1 / 8, 8, 1.0)}


def check_weights(tensors: dict[str, gguf.ReaderTensor], theirs: torch.nn.Module, reference: torch.nn.Module) -> None:
    """transformers' load of the written file against the reference's weights: F32 exact, F16 to its
    rounding, quantized blocks within the bounds above (and really quantized)."""
    ours_state, state = theirs.state_dict(), reference.state_dict()
    for name, t in tensors.items():
        want, got = state[hf_name(name)], ours_state[hf_name(name)]
        if t.tensor_type.name == "F32":
            assert torch.equal(got, want), name
        elif t.tensor_type.name == "F16":
            assert torch.equal(got, want.half().float()), name
        else:
            blocks = want.reshape(want.shape[0], -1, 32)
            scale, code, rounding = BLOCK[t.tensor_type.name]
            d = blocks.abs().amax(-1, keepdim=True) * scale
            bound = d * (rounding + code * 2**-11) * 1.001 + 1e-7
            assert ((got.reshape(blocks.shape) - blocks).abs() <= bound).all(), name
            assert not torch.equal(got, want)  # really quantized


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_hf_checkpoint_to_gguf(tiny, tmp_path, kind):
    path, reference = tiny
    out = tmp_path / "model.gguf"
    out.write_bytes(b"an older file, replaced whole")
    assert llamita.convert(path, out, type=kind) == out
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary file left beside it
    reader = gguf.GGUFReader(out)
    tensors = check_tensors(reader, reference, kind)
    check_metadata(reader, reference.config)
    assert {tensors[n].tensor_type.name for n in ("blk.0.ffn_down.weight", "output.weight")} == \
        {"F16", {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q8_0"}[kind]}  # 88-wide rows stay F16

    theirs = load_gguf(out)  # transformers dequantizes and puts q/k rows back in its own order
    check_weights(tensors, theirs, reference)

    ids = torch.randint(0, reference.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    expected, got = logits(reference, ids), logits(theirs, ids)
    tolerance = {"f16": 3e-3, "q8_0": 5e-2, "q4_0": 0.5}[kind]
    assert expected.abs().max() > 2
    assert (got - expected).abs().max().item() < tolerance * expected.abs().max().item()

    if kind == "f16":  # the tokenizer: transformers' from the GGUF against its own from the directory
        gguf_tok, hf_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name), AutoTokenizer.from_pretrained(
            path)
        assert gguf_tok(CHAT, add_special_tokens=False)["input_ids"] == hf_tok(CHAT, add_special_tokens=False)[
            "input_ids"]
        assert (gguf_tok.bos_token, gguf_tok.eos_token) == (hf_tok.bos_token, hf_tok.eos_token) == ("<s>", "</s>")
        assert gguf_tok.chat_template == hf_tok.chat_template and "im_start" in gguf_tok.chat_template


def test_gguf_to_hf_directory(tiny, tmp_path):
    """A GGUF (here q8_0) back to the Hugging Face layout: transformers' LlamaForCausalLM loads the
    directory with the logits its GGUF loader gives for the file, and the tokenizer is the source's."""
    path, _ = tiny
    llamita.convert(path, tmp_path / "m.gguf", type="q8_0")
    llamita.convert(tmp_path / "m.gguf", tmp_path / "hf")
    from_gguf = load_gguf(tmp_path / "m.gguf")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.dtype == torch.float32  # a quantized GGUF dequantizes to float32
    ids = torch.randint(0, from_gguf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    expected = logits(from_gguf, ids)
    assert (logits(model, ids) - expected).abs().max().item() < 1e-5 * expected.abs().max().item()
    tok, source_tok = AutoTokenizer.from_pretrained(tmp_path / "hf"), AutoTokenizer.from_pretrained(path)
    assert tok(CHAT, add_special_tokens=False)["input_ids"] == source_tok(CHAT, add_special_tokens=False)["input_ids"]
    assert tok.chat_template == source_tok.chat_template


@pytest.mark.parametrize("args", [["--type", "q5_k"], ["--type", "hf"]])
def test_bad_type_is_a_one_line_error(tmp_path, capsys, args):
    assert main(["convert", "smollm2-135m-instruct", str(tmp_path / "m.gguf"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamita: error:") and err.count("\n") == 1 and args[1] in err
    assert not list(tmp_path.iterdir())


def test_quantized_type_needs_a_gguf_out(tmp_path, capsys):
    assert main(["convert", "smollm2-135m-instruct", str(tmp_path / "out"), "--type", "q8_0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamita: error:") and err.count("\n") == 1 and ".gguf" in err
    assert not list(tmp_path.iterdir())


# -- Meta's checkpoint with Llama 2's SentencePiece vocabulary: llama.cpp's converter writes it too ----

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_meta_checkpoint_matches_llama_cpp_converter(llama_vocab, tmp_path, kind):
    from llamita.tokenizer import sentencepiece_model_from_gguf

    ckpt = tmp_path / "meta"
    ckpt.mkdir()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
              "vocab_size": -1}
    write_meta_checkpoint(ckpt, params, vocab=32000, n_shards=2)
    (ckpt / "tokenizer.model").write_bytes(sentencepiece_model_from_gguf(llama_vocab))  # Llama 2's
    oracle = tmp_path / "oracle.gguf"
    subprocess.run([sys.executable, str(llama_cpp_path("examples/convert_legacy_llama.py")), "--outtype", kind,
                    "--outfile", str(oracle), str(ckpt)], check=True, capture_output=True)
    ours = tmp_path / "ours.gguf"
    llamita.convert(ckpt, ours, type=kind)

    theirs_r, ours_r = gguf.GGUFReader(oracle), gguf.GGUFReader(ours)
    # every llama.* and tokenizer.* key llama.cpp writes, with its value and type (vocabulary included)
    keys = [k for k in theirs_r.fields if k.startswith(("llama.", "tokenizer.", "general.file_type"))]
    assert len(keys) > 12 and "tokenizer.ggml.scores" in keys
    for k in keys:
        assert ours_r.fields[k].types == theirs_r.fields[k].types, k
        assert ours_r.fields[k].contents() == theirs_r.fields[k].contents(), k
    fields = {k: f.contents() for k, f in ours_r.fields.items()}
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)

    expected = {t.name: t for t in theirs_r.tensors}
    got = {t.name: t for t in ours_r.tensors}
    assert set(got) == set(expected) == expected_names(2, tied=False)
    for name, t in expected.items():
        assert (got[name].tensor_type, list(got[name].shape)) == (t.tensor_type, list(t.shape)), name
        a, b = np.asarray(got[name].data), np.asarray(t.data)
        if kind == "f16" or t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            assert np.array_equal(a, b), name  # the same bytes: q/k in the same row order
        else:  # the same scales; a code may differ by one where the two round a tie differently
            a, b = a.reshape(-1, 34), b.reshape(-1, 34)
            assert np.array_equal(a[:, :2], b[:, :2]), name
            diff = np.abs(a[:, 2:].view(np.int8).astype(int) - b[:, 2:].view(np.int8).astype(int))
            assert diff.max() <= 1 and diff.mean() < 1e-4, name


# -- the default model (SmolLM2, tied embeddings, byte-level BPE) -------------------------------------

@pytest.fixture(scope="module")
def smol_f16(tmp_path_factory):
    """``llamita convert smollm2-135m-instruct OUT.gguf`` (the default type, f16) through the CLI in
    process, once for the module: the file and what the command wrote on stderr."""
    out = tmp_path_factory.mktemp("smol") / "smol.gguf"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["convert", "smollm2-135m-instruct", str(out)])
    assert code == 0, err.getvalue()
    return out, err.getvalue()


def test_tied_gguf_to_q4_0(tmp_path):
    """A GGUF source with tied embeddings (a tiny one: f16, written from tiny_base with the embedding
    tied) to q4_0, as the default model is: the embedding, which is also the output layer, stored
    Q8_0; transformers' load of the result against its load of the source, weight by weight and in
    logits. (The default model's own path, its Q4_1 source and vocabulary, is test_default_model_to_gguf's.)"""
    hf = tiny_base(tmp_path / "hf", seed=3, tie_word_embeddings=True)
    source = llamita.convert(hf, tmp_path / "source.gguf", type="f16")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(source).tensors}  # tied in the source too
    reference = load_gguf(source)
    assert reference.config.tie_word_embeddings
    out = llamita.convert(source, tmp_path / "out.gguf", type="q4_0", dtype=torch.float32)  # as the default model loads
    reader = gguf.GGUFReader(out)
    tensors = check_tensors(reader, reference, "q4_0")
    check_metadata(reader, reference.config)
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0" and "output.weight" not in tensors
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_0"
    theirs = load_gguf(out)
    check_weights(tensors, theirs, reference)
    ids = torch.randint(0, reference.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(4))
    expected, got = logits(reference, ids), logits(theirs, ids)
    assert expected.abs().max() > 2
    assert (got - expected).abs().max().item() < 0.5 * expected.abs().max().item()


@pytest.mark.slow  # q8_0 is checked byte for byte against llama.cpp's converter (the Meta test above);
# q4_0 of a tied GGUF source by test_tied_gguf_to_q4_0
@pytest.mark.parametrize("kind", ["f16"])
def test_default_model_to_gguf(hf_default_model, hf_smol, smol_f16, kind):
    out, _ = smol_f16  # the CLI's default type: the file test_cli_round_trip reads back too
    reader = gguf.GGUFReader(out)
    check_tensors(reader, hf_default_model, kind)
    check_metadata(reader, hf_default_model.config)

    ids = torch.tensor([hf_smol(TEXT)["input_ids"]])
    expected, got = logits(hf_default_model, ids), logits(load_gguf(out), ids)
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    # f16 only rounds the dequantized source weights; q8_0 and q4_0 quantize them once more
    tolerance, top1 = {"f16": (3e-3, 1.0), "q8_0": (0.08, 0.95), "q4_0": (0.8, 0.5)}[kind]
    assert expected.abs().max() > 10
    assert (got - expected).abs().max().item() < tolerance * expected.abs().max().item()
    assert agree >= top1

    if kind != "f16":
        return  # the tokenizer is the same in every type
    tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert tok(CHAT + TEXT)["input_ids"] == hf_smol(CHAT + TEXT)["input_ids"]
    assert tok.chat_template == hf_smol.chat_template and tok.eos_token == hf_smol.eos_token


@pytest.mark.slow
def test_merged_checkpoint_gets_back_the_gguf_vocabulary(default_gguf, tmp_path):
    """``merge`` writes a GGUF base's byte-level vocabulary as tokenizer.json; converting that checkpoint
    to GGUF gives back the original file's vocabulary, merges, pre-tokenizer, specials and template."""
    from llamita.formats.export import write_tokenizer
    from llamita.formats.gguf_write import tokenizer_fields

    write_tokenizer(default_gguf, tmp_path)
    (tmp_path / "config.json").write_text("{}")
    fields = tokenizer_fields(tmp_path, 49152)
    original = gguf.GGUFReader(default_gguf).fields
    keys = ["tokenizer.ggml." + k for k in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id",
                                            "eos_token_id", "add_bos_token")] + ["tokenizer.chat_template"]
    for key in keys:
        assert fields[key][0] == original[key].contents(), key
        assert fields[key][1:] == (original[key].types[0], original[key].types[-1] if len(original[key].types) > 1
                                   else None), key


@pytest.mark.slow
def test_cli_round_trip(smol_f16, hf_default_model, hf_smol, tmp_path):
    """``llamita convert`` to GGUF f16 (the module's file, written by the CLI in process), then that
    file to a Hugging Face directory by ``python -m llamita convert``: transformers loads it with the
    source's logits (to float16's rounding) and tokenizer."""
    out, stderr = smol_f16
    assert str(out) in stderr
    result = run_cli("convert", str(out), str(tmp_path / "hf"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "hf") in result.stderr
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([hf_smol(TEXT)["input_ids"]])
    expected = logits(hf_default_model, ids)
    assert (logits(model, ids) - expected).abs().max().item() < 3e-3 * expected.abs().max().item()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok(CHAT + TEXT)["input_ids"] == hf_smol(CHAT + TEXT)["input_ids"]
