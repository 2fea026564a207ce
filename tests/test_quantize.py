"""Weight-only quantized layers: the kernel and the pure-PyTorch path against plain matmuls of codes
unpacked here by the format's definition, the default model's Q4_1 and Q8_0 weights against the gguf
package's dequantization, float16 against transformers."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from llamita import LlamitaError, cli, kernels
from llamita.cache import KVCache
from llamita.config import Config
from llamita.formats import interleaved_to_half, load_model
from llamita.generate import cache_size_for, compile_decoding, decode_step
from llamita.llm import LLM
from llamita.model import Llama
from llamita.quantize import (
    BLOCKS,
    DEQUANTIZE_FROM_ROWS,
    Float16Linear,
    QuantizedWeight,
    QuantLinear,
    ScreenedLMHead,
    group_quantize,
    quantize,
)


def values(q: QuantizedWeight) -> torch.Tensor:
    """The weights a QuantizedWeight stands for, by the layout's definition: in each run of 32 weights
    byte j holds weight j (low nibble) and weight j + 16 (high); w = code * scale + offset per group."""
    N = q.codes.shape[0]
    if q.bits == 4:
        b = q.codes.cpu().to(torch.int64).view(N, -1, 16)
        codes = torch.cat([b % 16, b // 16], dim=-1).reshape(N, -1)
    else:
        codes = q.codes.cpu().to(torch.int64)
    scale = q.scales.cpu().half().float().repeat_interleave(q.group_size, dim=1)
    offset = 0 if q.offsets is None else q.offsets.cpu().half().float().repeat_interleave(q.group_size, dim=1)
    return codes.float() * scale + offset


def random_weight(bits: int, group: int, offsets: bool, N: int = 96, K: int = 256, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        codes = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
    else:
        codes = torch.randint(-128, 128, (N, K), generator=g).to(torch.int8)
    scales = (torch.rand(N, K // group, generator=g) * 0.02 + 0.001).half()
    return QuantizedWeight(codes, scales, (torch.randn(N, K // group, generator=g) * 0.05).half() if offsets else None,
                           bits, group)


Q8_0 = gguf.GGMLQuantizationType.Q8_0
LAYOUTS = [(4, 32, True), (4, 64, True), (8, 32, False), (8, 32, True), (8, 16, False)]


@pytest.mark.parametrize("bits,group,offsets", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 3, 8, 13, DEQUANTIZE_FROM_ROWS + 3])  # the kernel's row tiles; a prompt's GEMM
@pytest.mark.parametrize("path", ["kernel", "pytorch"])
def test_quant_linear_is_a_matmul_of_its_weights(bits, group, offsets, rows, path):
    q = random_weight(bits, group, offsets)
    layer = QuantLinear(q)
    if path == "kernel":
        assert kernels.available(), "the C kernel did not build (is gcc installed?)"
    layer.kernel = path == "kernel"
    w = values(q)
    torch.testing.assert_close(layer.dequantize(), w, atol=0, rtol=0)
    x = torch.randn(2, rows, 256, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert y.shape == (2, rows, 96) and y.dtype == torch.float32
    if layer.kernel and rows < DEQUANTIZE_FROM_ROWS:
        # the kernel takes x in int8 blocks of 32, as llama.cpp's Q8_0 (whose own scale is float16:
        # 2^-11 apart from the kernel's float32 one, hence the tolerance)
        as_q8_0 = gguf.quants.dequantize(gguf.quants.quantize(x.reshape(-1, 256).numpy(), Q8_0), Q8_0)
        ref = torch.from_numpy(as_q8_0).view(x.shape) @ w.T
        torch.testing.assert_close(y, ref, atol=2e-3 * ref.abs().max().item(), rtol=0)
        assert (y - x @ w.T).abs().max() < 2e-2 * ref.abs().max()  # what the int8 activations cost
    else:
        torch.testing.assert_close(y, x @ w.T, atol=1e-4, rtol=1e-4)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_kernel_reads_k_quant_blocks_as_stored(qtype, rows):
    """Q4_K and Q6_K blocks (valid ones, as in tests/helpers.py) held as stored: the kernel gives the
    product of gguf's dequantized weights with x rounded to int8, scale = absmax / 127, per block of
    256 (llama.cpp's Q8_K; Q4_K with one to three rows: of 32); the PyTorch path, x times gguf's
    weights."""
    import numpy as np

    from helpers import _valid_blocks

    raw = _valid_blocks(np.random.default_rng(0), gguf.GGMLQuantizationType[qtype], (40, 512))
    layer = QuantLinear(QuantizedWeight(torch.from_numpy(raw), None, None, BLOCKS[qtype][1], 256, blocks=qtype))
    assert kernels.available() and layer.blocks == qtype and layer.codes.shape == raw.shape  # no copy in another form
    w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])).float()
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    block = 32 if qtype == "Q4_K" and rows < 4 else 256
    blocks = x.view(rows, 512 // block, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    as_q8_k = ((blocks / scale).round() * scale).view(rows, 512)
    ref = as_q8_k @ w.T
    torch.testing.assert_close(layer(x), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(layer.dequantize(), w, atol=0, rtol=0)
    layer.kernel = False
    torch.testing.assert_close(layer(x), x @ w.T, atol=1e-4 * ref.abs().max().item(), rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's tinygemm path needs a GPU")
def test_cuda_int4_matches_its_weights():
    device = "cuda"
    q = random_weight(4, 32, True)
    layer = QuantLinear(q.map_rows(lambda t: t.to(device)))
    x = torch.randn(5, 256, device=device)
    ref = x @ values(q).to(device).T
    torch.testing.assert_close(layer(x).float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)  # bfloat16


@pytest.mark.parametrize("bits", [4, 8])
def test_group_quantize_error_is_at_most_half_a_step(bits):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 1, 64)[:, None]
    q = group_quantize(w, 32, bits)
    codes = q.unpacked_codes().to(torch.int64)
    if bits == 4:
        groups = codes.view(64, 8, 32)
        assert (groups.amin(-1) == 0).all() and (groups.amax(-1) == 15).all()  # min and max land on codes
    else:
        assert codes.abs().view(64, 8, 32).amax(-1).eq(127).all()  # absmax lands on +-127
    step = q.scales.float().repeat_interleave(32, dim=1)
    err = (values(q) - w).abs()
    # half a step, plus float16's rounding of the scale and offset (relative 2^-11 each)
    extent = w.abs().view(64, 8, 32).amax(-1).repeat_interleave(32, dim=1)
    assert (err <= 0.5 * step + 2**-10 * (extent + 15 * step)).all()
    assert err.mean() < 0.3 * step.mean()


def test_row_chunks_change_nothing():
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(3))
    whole, chunked = group_quantize(w, 32, 4, rows=1024), group_quantize(w, 32, 4, rows=128)
    assert torch.equal(whole.codes, chunked.codes) and torch.equal(whole.scales, chunked.scales)


def test_constant_group_is_exact():
    w = torch.full((8, 32), 0.25)
    w[1] = -3.0
    assert torch.equal(values(group_quantize(w, 32)), w)


def test_bad_group_size():
    with pytest.raises(ValueError):
        group_quantize(torch.randn(8, 48, generator=torch.Generator().manual_seed(0)), 32)


@pytest.fixture(scope="module")
def int4_model(default_gguf):
    """The default model as the file stores it: its Q4_1 blocks packed as they are."""
    return load_model(default_gguf, quantize="int4")


def test_default_model_codes_reproduce_the_gguf_dequantization(default_gguf, int4_model):
    """The layers' weights, read back by the layout's definition, are exactly gguf.quants.dequantize's
    values; q/k rows in llamita's rotate-half order; the tied output layer is the Q8_0 embedding."""
    c = int4_model.config
    stored = {t.name: t for t in gguf.GGUFReader(default_gguf).tensors}

    def reference(name, heads=None):
        t = stored[name]
        ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))
        return interleaved_to_half(ref, heads) if heads else ref

    qkv = int4_model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear) and qkv.bits == 4
    q_rows = c.n_heads * c.head_dim
    assert torch.equal(values(qkv.quantized)[:q_rows], reference("blk.0.attn_q.weight", c.n_heads))
    down = int4_model.layers[2].mlp.down_proj
    assert torch.equal(values(down.quantized), reference("blk.2.ffn_down.weight"))
    head = int4_model.lm_head
    assert isinstance(head, QuantLinear) and head.bits == 8
    assert stored["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert torch.equal(values(head.quantized), reference("token_embd.weight"))


@pytest.mark.slow
def test_requantizing_the_float_weights_gives_the_same_int4(hf_default_model, int4_model):
    """min/max per 32-group recovers Q4_1's own codes, so quantizing float weights is lossless for
    them too; fused layers hold their parts' rows in order (q, k, v; gate, up)."""
    original = {k.removeprefix("model."): w for k, w in hf_default_model.state_dict().items()}  # transformers' load
    attn, mlp = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]
    for i, fused, parts in [(0, "self_attn.qkv_proj", attn), (12, "mlp.gate_up_proj", mlp),
                            (29, "self_attn.o_proj", ["self_attn.o_proj"])]:
        from_file = int4_model.layers[i].get_submodule(fused)
        requantized = group_quantize(torch.cat([original[f"layers.{i}.{p}.weight"] for p in parts]))
        assert torch.equal(requantized.codes, from_file.codes)
        torch.testing.assert_close(values(requantized), values(from_file.quantized), atol=1e-6, rtol=1e-3)


@pytest.mark.slow
def test_quantized_model_structure(int4_model):
    for layer in int4_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert all(isinstance(m, QuantLinear) and m.bits == 4
                   for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        assert not any(hasattr(m, p) for m, p in [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"),
                                                  (mlp, "gate_proj"), (mlp, "up_proj")])
        assert (attn.qkv_proj.out_features, mlp.gate_up_proj.out_features) == (576 + 2 * 192, 2 * 1536)
    assert int4_model.embed_tokens.table is int4_model.lm_head  # the file's Q8_0 table, tied
    assert int4_model.norm.weight.dtype == torch.float32  # the body runs in float32 on CPU


@pytest.fixture(scope="module")
def requantized_model(default_model):
    """The float model quantized to int4 after loading (as after merging an adapter)."""
    return quantize(copy.deepcopy(default_model), "int4")


@pytest.mark.slow
@pytest.mark.parametrize("length", [16, DEQUANTIZE_FROM_ROWS + 16])  # decode's kernel; a prompt's GEMM
@pytest.mark.parametrize("which", ["int4_model", "requantized_model"])
def test_quantized_model_agrees_with_float32(default_model, request, which, length):
    """The int4 weights are the file's own values (up to float16 scales), so only the output layer
    (the file's Q8_0, or the int4 screen) and the order of sums differ."""
    model = request.getfixturevalue(which)
    ids = torch.randint(0, default_model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = default_model(ids)[0]
        out = model(ids)[0].float()
    assert ref.argmax(-1)[-1] == out.argmax(-1)[-1]
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() >= 0.8
    for r, o in zip(ref, out):
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
    # The kernel rounds activations to int8 (as llama.cpp does), a step function: the last-bit
    # differences between a whole pass and cached steps move values by a step of 1/127 here and
    # there, which 30 layers spread (measured: 0.6% of the largest logit on average, 2.8% at most).
    torch.testing.assert_close(steps, full, atol=6e-2 * full.abs().max().item(), rtol=0)
    assert (steps - full).abs().mean() < 1.5e-2 * full.abs().max()


@pytest.mark.slow
def test_compiled_decoding_matches_eager():
    """``compile_decoding`` (fixed shapes: attention over the whole power-of-two cache, masked)
    gives eager decoding's tokens and logits, on an int4 model (the kernel is a custom op)."""
    torch.manual_seed(0)
    config = Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=1024)
    model = quantize(Llama(config).eval(), "int4")
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
def test_screened_lm_head_is_exact_on_its_shortlist(requantized_model):
    """The shortlist's logits are the 16-bit weights' own (float32 products); the rest are the
    int4 screen's, and the greedy choice is the exact output layer's."""
    head = requantized_model.lm_head
    assert isinstance(head, ScreenedLMHead)
    assert head.weight is requantized_model.embed_tokens.weight  # still tied
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
    return quantize(copy.deepcopy(default_model), "float16")


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


@pytest.mark.slow
def test_llm_runs_a_quantized_gguf_as_stored_by_default(hf_default_model):
    """LLM.load() of the default model (Q4_1 blocks, a Q8_0 table) keeps its quantized weights, as
    llama.cpp runs the file; alone and batched, its greedy text starts as transformers' float32 one
    does, and, fed that text, it predicts nearly every next token of it. The kernel's int8
    activations (as llama.cpp's) can tip a near tie, after which greedy texts part: alone and in a
    batch, whose last-bit differences round differently, too."""
    llm = LLM.load()
    layers = [m for m in llm.model.modules() if isinstance(m, QuantLinear)]
    assert {m.bits for m in layers} == {4, 8} and len(layers) == 4 * 30 + 1  # the blocks', the tied table
    prompts = ["The capital of France is", "Once upon a time, in a small village,"]
    batched = llm.generate_batch(prompts, temperature=0, max_new_tokens=24)
    alone = [llm.generate(p, temperature=0, max_new_tokens=24) for p in prompts]
    for prompt, texts in zip(prompts, zip(batched, alone)):
        ids = llm.encode(prompt)
        with torch.no_grad():
            theirs = hf_default_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=2)
            continuation = theirs[0, len(ids):]
            assert all(text.startswith(llm.tokenizer.decode(continuation[:3].tolist())) for text in texts)
            predicted = llm.model(theirs)[0, len(ids) - 1: -1].argmax(-1)  # teacher-forced, on the kernel
        assert (predicted == continuation).float().mean() >= 0.9


def test_float16_refuses_what_it_cannot_do(default_gguf):
    with pytest.raises(LlamitaError, match="compile"):
        LLM.load(default_gguf, quantize="float16", compile=True)
    with pytest.raises(LlamitaError, match="known: auto, none, int4, int8, float16"):
        LLM.load(default_gguf, quantize="int3")


@pytest.mark.slow
def test_cli_quantize_float16(float16_llm, capsys):
    """``generate --quantize float16`` through the CLI in process (its own load of the model; the
    process itself is test_generate.py's test_cli_generate): the fixture's text, and --compile refused."""
    assert cli.main(["generate", "The capital of France is", "--quantize", "float16", "--temperature", "0",
                     "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out == float16_llm.generate("The capital of France is", temperature=0, max_new_tokens=12) + "\n"
    assert cli.main(["generate", "Hi", "--quantize", "float16", "--compile"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("llamita: error: --compile cannot trace float16") and \
        "Traceback" not in err
