"""Weight-only int4 and float16: the packed kernels against plain matmuls, the default model's
Q4_1 weights against the gguf package's own dequantization, float16 against transformers."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from helpers import run_cli
from llamita import LlamitaError
from llamita.cache import KVCache
from llamita.config import Config
from llamita.formats import interleaved_to_half
from llamita.formats.gguf import open_gguf, q4_1_tensors
from llamita.generate import cache_size_for, compile_decoding, decode_step
from llamita.llm import LLM
from llamita.model import Llama
from llamita.quantize import (
    DEQUANTIZE_FROM_ROWS,
    Float16Linear,
    Int4Linear,
    ScreenedLMHead,
    group_quantize,
    quantize_float16,
    quantize_int4,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dequantize_reference(codes, scales, zeros, group_size, dtype=torch.float32):
    """w = (q - 8) * scale + zero per group, with scales and zeros rounded to the layer's dtype."""
    s, z = (x.to(dtype).float().repeat_interleave(group_size, dim=1) for x in (scales, zeros))
    return (codes.float() - 8) * s + z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("rows", [5, DEQUANTIZE_FROM_ROWS + 3])  # the int4 kernel; on CPU, also the GEMM path
def test_int4_linear_matches_matmul_of_its_weights(device, group_size, rows):
    torch.manual_seed(0)
    w = torch.randn(384, 256, device=device)
    codes, scales, zeros = group_quantize(w, group_size)
    layer = Int4Linear.from_codes(codes, scales, zeros, group_size)
    torch.testing.assert_close(layer.dequantize(),
                               dequantize_reference(codes, scales, zeros, group_size, torch.bfloat16))
    x = torch.randn(1, rows, 256, device=device).bfloat16()
    ref = x.float() @ layer.dequantize().T
    y = layer(x)
    assert y.shape == (1, rows, 384) and y.dtype == torch.bfloat16
    # bfloat16 output: ~3 significant digits.
    torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


def test_float32_int4_kernel_is_exact():
    """The CPU kernel's float32 path against the plain codes: a wrong nibble order or scale
    layout in either packing would show at once."""
    torch.manual_seed(1)
    codes, scales, zeros = group_quantize(torch.randn(96, 128), 32)
    layer = Int4Linear.from_codes(codes, scales, zeros, 32, dtype=torch.float32)
    w = dequantize_reference(codes, scales, zeros, 32)
    torch.testing.assert_close(layer.dequantize(), w, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ w.T, atol=1e-4, rtol=1e-5)


def test_group_quantize_error_is_at_most_half_a_step():
    torch.manual_seed(2)
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    codes, scales, zeros = group_quantize(w, 32)
    assert codes.min() >= 0 and codes.max() <= 15
    groups = codes.view(64, 8, 32)
    assert (groups.amin(-1) == 0).all() and (groups.amax(-1) == 15).all()  # min and max land on codes
    step = scales.repeat_interleave(32, dim=1)
    err = (dequantize_reference(codes, scales, zeros, 32) - w).abs()
    assert (err <= 0.5 * step * (1 + 1e-4)).all()
    assert err.mean() < 0.3 * step.mean()


def test_constant_group_is_exact():
    w = torch.full((8, 32), 0.25)
    w[1] = -3.0
    codes, scales, zeros = group_quantize(w, 32)
    assert torch.equal(dequantize_reference(codes, scales, zeros, 32), w)


def test_bad_group_size():
    with pytest.raises(ValueError):
        group_quantize(torch.randn(8, 48, generator=torch.Generator().manual_seed(0)), 32)
    with pytest.raises(ValueError):
        Int4Linear(64, 8, group_size=16)


@pytest.fixture(scope="module")
def int4_model(default_model, default_gguf):
    """The default model with int4 layers packed straight from the file's Q4_1 blocks."""
    return quantize_int4(copy.deepcopy(default_model), gguf_path=default_gguf)


def test_q4_1_codes_reproduce_the_gguf_dequantization(default_gguf, default_model):
    """Codes, scales and zeros read from the file, packed (float32 path), give back exactly what
    gguf.quants.dequantize gives; q/k rows in llamita's rotate-half order."""
    c = default_model.config
    reader = open_gguf(default_gguf)
    stored = {t.name: t for t in reader.tensors}
    wanted = {"layers.0.self_attn.q_proj": ("blk.0.attn_q.weight", c.n_heads),
              "layers.1.self_attn.k_proj": ("blk.1.attn_k.weight", c.n_kv_heads),
              "layers.2.mlp.down_proj": ("blk.2.ffn_down.weight", None)}
    seen = 0
    for name, codes, scales, zeros in q4_1_tensors(default_gguf, c):
        if name not in wanted:
            continue
        t = stored[wanted[name][0]]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))
        if heads := wanted[name][1]:
            ref = interleaved_to_half(ref, heads)
        exact = Int4Linear.from_codes(codes, scales, zeros, 32, dtype=torch.float32)
        torch.testing.assert_close(exact.dequantize(), ref, atol=1e-6, rtol=1e-6)
        # The fast layer differs only by bfloat16's rounding of each scale and zero (2^-8 relative).
        err = (Int4Linear.from_codes(codes, scales, zeros, 32).dequantize() - ref).abs()
        s, z = (x.abs().repeat_interleave(32, dim=1) for x in (scales, zeros))
        assert (err <= ((codes - 8).abs() * s + z) * 2**-8 * 1.01).all()
        seen += 1
        if seen == len(wanted):
            break
    assert seen == len(wanted)


@pytest.mark.slow
def test_requantizing_the_float_weights_gives_the_same_int4(hf_default_model, int4_model):
    """min/max per 32-group recovers Q4_1's own codes and scales, so the float path is lossless
    too; fused layers hold their parts' rows in order (q, k, v; gate, up)."""
    original = {k.removeprefix("model."): w for k, w in hf_default_model.state_dict().items()}  # transformers' load
    attn, mlp = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]
    for i, fused, parts in [(0, "self_attn.qkv_proj", attn), (12, "mlp.gate_up_proj", mlp),
                            (29, "self_attn.o_proj", ["self_attn.o_proj"])]:
        from_file = int4_model.layers[i].get_submodule(fused)
        assert isinstance(from_file, Int4Linear)
        requantized = Int4Linear.from_float(torch.cat([original[f"layers.{i}.{p}.weight"] for p in parts]))
        assert torch.equal(requantized.codes, from_file.codes) and torch.equal(requantized.weight, from_file.weight)
        torch.testing.assert_close(requantized.scales_and_zeros, from_file.scales_and_zeros, atol=0, rtol=0)


@pytest.mark.slow
def test_quantized_model_structure(default_model, int4_model):
    for layer in int4_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert all(isinstance(m, Int4Linear) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        assert not any(hasattr(m, p) for m, p in [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"),
                                                  (mlp, "gate_proj"), (mlp, "up_proj")])
        assert (attn.qkv_proj.out_features, mlp.gate_up_proj.out_features) == (576 + 2 * 192, 2 * 1536)
    assert int4_model.embed_tokens.weight.dtype == torch.float16  # the fastest 16-bit GEMV on CPU
    assert isinstance(int4_model.lm_head, ScreenedLMHead)
    assert int4_model.lm_head.weight is int4_model.embed_tokens.weight  # still tied
    assert int4_model.norm.weight.dtype == torch.float32  # the body runs in float32 on CPU
    assert default_model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float32  # the original is untouched


@pytest.mark.slow
@pytest.mark.parametrize("length", [16, DEQUANTIZE_FROM_ROWS + 16])  # decode's kernel; a prompt's GEMM
def test_quantized_model_agrees_with_float32(default_model, int4_model, length):
    """The int4 weights are the file's own values (up to bfloat16 scales), so mostly the
    bfloat16 activations at the matmuls and the output layer's int4 screen differ."""
    ids = torch.randint(0, default_model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = default_model(ids)[0]
        out = int4_model(ids)[0].float()
    assert ref.argmax(-1)[-1] == out.argmax(-1)[-1]
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() >= 0.8
    for r, o in zip(ref, out):  # over the whole vocabulary, most of it the screen's int4 logits
        assert torch.corrcoef(torch.stack([r, o]))[0, 1] > 0.97


@pytest.mark.slow
def test_quantized_model_decodes_with_the_cache(int4_model):
    """Token-by-token with the KV cache gives the logits of one full forward."""
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 5045, 30]])
    with torch.inference_mode():
        full = int4_model(ids)[0, 3:7].float()
        cache = KVCache(int4_model, rows=1, slots=16)
        steps = [int4_model(ids[:, :4], kv=cache.sequence_step(torch.arange(4), 4))[0, -1]]
        steps += [decode_step(int4_model, cache, [int(ids[0, i])], [i])[0] for i in range(4, 7)]
    steps = torch.stack(steps).float()
    assert (steps.argmax(-1) == full.argmax(-1)).all()
    torch.testing.assert_close(steps, full, atol=0.1 * full.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_compiled_decoding_matches_eager():
    """``compile_decoding`` (fixed shapes: attention over the whole power-of-two cache, masked)
    gives eager decoding's tokens and logits, on an int4 model as LLM.load(compile=True) runs it."""
    torch.manual_seed(0)
    config = Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=1024)
    model = quantize_int4(Llama(config).eval())
    compiled = compile_decoding(model)
    prompt = torch.randint(0, 256, (1, 11))
    runs = []
    with torch.inference_mode():
        for forward in (None, compiled):
            cache = KVCache(model, 1, cache_size_for(11 + 24, config.max_seq_len, forward is not None))
            logits = [model(prompt, kv=cache.sequence_step(torch.arange(11), 11))[0, -1]]
            for pos in range(11, 11 + 24):
                logits.append(decode_step(model, cache, [int(logits[-1].argmax())], [pos], forward=forward)[0])
            runs.append(torch.stack(logits).float())
    eager, fixed = runs
    assert cache.slots == 256 and cache_size_for(35, 1024, True) == 256
    assert torch.equal(eager.argmax(-1), fixed.argmax(-1))
    torch.testing.assert_close(fixed, eager, atol=1e-3 * eager.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_screened_lm_head_is_exact_on_its_shortlist(int4_model):
    """The shortlist's logits are the 16-bit weights' own (float32 products); the rest are the
    int4 screen's, and the greedy choice is the exact output layer's."""
    head = int4_model.lm_head
    x = torch.randn(3, 5, 576, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = head(x)
        exact = x @ head.weight.float().T
        screen = head.screen(x).float()
    top = screen.topk(head.shortlist, dim=-1).indices
    torch.testing.assert_close(logits.gather(-1, top), exact.gather(-1, top), atol=1e-4, rtol=1e-5)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, top, False)
    assert torch.equal(logits[rest], screen[rest])
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))


# -- float16 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 16, 300])
def test_float16_linear_is_a_matmul_of_its_float16_weights(rows):
    w = torch.randn(96, 160, generator=torch.Generator().manual_seed(0))
    layer = Float16Linear(w)
    assert torch.equal(layer.dequantize(), w.half().float())  # packed and unpacked: float16's rounding only
    x = torch.randn(2, rows, 160, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ w.half().float().T, atol=1e-4, rtol=1e-4)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def float16_model(default_model):
    return quantize_float16(copy.deepcopy(default_model))


@pytest.mark.slow
def test_float16_model_structure(default_model, float16_model, hf_default_model):
    for layer in float16_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert all(isinstance(m, Float16Linear) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        assert not any(hasattr(m, p) for m, p in [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"),
                                                  (mlp, "gate_proj"), (mlp, "up_proj")])
    original = hf_default_model.model.layers[7]  # transformers' load: parts apart
    fused = torch.cat([original.mlp.gate_proj.weight, original.mlp.up_proj.weight])
    assert torch.equal(float16_model.layers[7].mlp.gate_up_proj.dequantize(), fused.half().float())
    assert isinstance(float16_model.lm_head, Float16Linear)
    assert float16_model.embed_tokens.weight.dtype == torch.float16
    assert float16_model.norm.weight.dtype == torch.float32
    assert default_model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float32  # the original is untouched


@pytest.mark.slow
def test_float16_model_matches_transformers(float16_model, hf_default_model, smol):
    """float16 weights lose ~3 decimal digits against the float32 reference: the logits stay
    within a few hundredths and nearly every greedy choice is the same."""
    text = ("The llama is a domesticated South American camelid, widely used as a meat and pack animal by "
            "Andean cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd.")
    ids = torch.tensor([smol.encode(text, bos=smol.add_bos)])
    with torch.inference_mode():
        got = float16_model(ids)[0]
        expected = hf_default_model(ids).logits[0]
    assert expected.abs().max() > 10
    assert (got - expected).abs().max().item() < 0.1
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.97


@pytest.fixture(scope="module")
def float16_llm(default_gguf):
    return LLM.load(default_gguf, quantize="float16")


@pytest.mark.slow
def test_float16_llm_batches_and_decodes_like_transformers(float16_llm, hf_default_model):
    """LLM.load(quantize="float16"): greedy text as transformers' float32 model gives it, and the
    same in a batch (the server's path) as alone."""
    llm = float16_llm
    prompts = ["The capital of France is", "Once upon a time, in a small village,"]
    batched = llm.generate_batch(prompts, temperature=0, max_new_tokens=16)
    assert batched == [llm.generate(p, temperature=0, max_new_tokens=16) for p in prompts]
    ids = llm.encode(prompts[1])
    with torch.no_grad():
        theirs = hf_default_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=2)
    assert batched[1] == llm.tokenizer.decode(theirs[0, len(ids):].tolist())


def test_float16_refuses_what_it_cannot_do(default_gguf):
    with pytest.raises(LlamitaError, match="compile"):
        LLM.load(default_gguf, quantize="float16", compile=True)
    with pytest.raises(LlamitaError, match="known: int4, float16"):
        LLM.load(default_gguf, quantize="int8")


@pytest.mark.slow
def test_cli_quantize_float16(float16_llm):
    out = run_cli("generate", "The capital of France is", "--quantize", "float16", "--temperature", "0",
                  "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout == float16_llm.generate("The capital of France is", temperature=0, max_new_tokens=12) + "\n"
    out = run_cli("generate", "Hi", "--quantize", "float16", "--compile")
    assert out.returncode != 0 and "--compile cannot trace float16" in out.stderr and "Traceback" not in out.stderr
