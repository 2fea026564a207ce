"""Loading never holds a float32 copy of the model: peak memory, measured in a subprocess, stays
within the loaded model's own bytes plus one layer's float32 size (issue 11's bound)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from helpers import write_tiny_gguf

LAYERS, DIM, HIDDEN = 4, 2048, 5632
LAYER_FLOAT32 = 4 * (2 * DIM * DIM + 2 * DIM // 2 * DIM + 3 * DIM * HIDDEN)  # q, o, k, v (GQA), gate, up, down

MEASURE = """
import json, sys
import torch
import llamita.formats.gguf, llamita.formats.hf, llamita.quantize, llamita.kernels
llamita.kernels.available()  # the kernel is built (or found) before measuring
with torch.device("meta"):  # torch's one-time imports for initialising on meta (~70 MB, whatever the model)
    torch.nn.Embedding(8, 8)

def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

before = status("VmRSS")
model = llamita.formats.load_model(sys.argv[1], quantize=sys.argv[2])
peak = status("VmHWM")
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"grew": peak - before, "held": held,
                  "layers": sorted({type(m).__name__ for m in model.layers[0].modules()})}))
"""


def peak_growth(source, quantize: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(source), quantize], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q6_K"])
def test_quantized_gguf_loads_without_a_float_copy(tmp_path, qtype):
    types = {f"blk.0.{n}.weight": qtype for n in
             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    path = write_tiny_gguf(tmp_path / "m.gguf", types=types, valid_blocks=True, layers=LAYERS, dim=DIM, hidden=HIDDEN)
    m = peak_growth(path, "auto")
    assert "QuantLinear" in m["layers"]
    assert m["held"] < LAYERS * LAYER_FLOAT32 / 2.5  # 4 to 8 bits a weight, not 32
    # The old loader dequantized every tensor: it grew by LAYERS float32 layers (4x LAYER_FLOAT32).
    assert m["grew"] <= m["held"] + LAYER_FLOAT32, m


@pytest.mark.slow
def test_bfloat16_hf_checkpoint_quantizes_while_loading(tmp_path):
    heads, kv = 8, 4
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
              "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": 256, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
              "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).bfloat16()  # noqa: E731
    tensors = {"model.embed_tokens.weight": rand(256, DIM), "model.norm.weight": rand(DIM),
               "lm_head.weight": rand(256, DIM)}
    kv_dim = DIM // heads * kv
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": rand(DIM, DIM), p + "self_attn.k_proj.weight": rand(kv_dim, DIM),
                        p + "self_attn.v_proj.weight": rand(kv_dim, DIM), p + "self_attn.o_proj.weight": rand(DIM, DIM),
                        p + "mlp.gate_proj.weight": rand(HIDDEN, DIM), p + "mlp.up_proj.weight": rand(HIDDEN, DIM),
                        p + "mlp.down_proj.weight": rand(DIM, HIDDEN), p + "input_layernorm.weight": rand(DIM),
                        p + "post_attention_layernorm.weight": rand(DIM)})
    save_file(tensors, tmp_path / "model.safetensors")
    del tensors
    m = peak_growth(tmp_path, "int4")
    assert "QuantLinear" in m["layers"]
    assert m["held"] < LAYERS * LAYER_FLOAT32 / 5
    # Loading the bfloat16 model first would grow by LAYERS bfloat16 layers (2x LAYER_FLOAT32).
    assert m["grew"] <= m["held"] + LAYER_FLOAT32, m
