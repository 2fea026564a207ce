"""LoRA: step 0 equals the base; adapters round-trip with PEFT (transformers + peft are the oracle);
merged checkpoints load in transformers; adapters for another base are refused."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM

import llamita
import llamita.formats.export
from helpers import CONFIGS, FAST, alpaca_records, losses, random_tokens, tiny_base, tiny_hf, write_data
from llamita import cli
from llamita.errors import LlamitaError
from llamita.lora import LoRAConfig, LoRADropout, LoRALinear, apply_lora, parse_targets
from llamita.peft import load_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"), seed=3)


def hf(base) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def ids() -> torch.Tensor:
    return random_tokens(300, seed=7)


def test_step_zero_equals_the_base(base):
    model = llamita.load_model(base, dtype=torch.float32)
    with torch.no_grad():
        before = model(ids())
        apply_lora(model, LoRAConfig(r=4, targets="all", dropout=0.0))
        after = model(ids())
    assert sum(len(m.adapters) for m in model.modules() if isinstance(m, LoRALinear)) == 7 * 3
    assert torch.equal(before, after)
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_targets_parse():
    assert parse_targets("q,v") == ("q", "v")
    assert parse_targets("down_proj, q") == ("q", "down")
    assert parse_targets("all") == ("q", "k", "v", "o", "gate", "up", "down")
    with pytest.raises(LlamitaError, match="unknown module 'x'"):
        parse_targets("q,x")


def test_trained_adapter_loads_in_peft_with_equal_logits(base, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    adapter = llamita.finetune(base, data, tmp_path / "run", steps=6, lora_r=4, lora_alpha=8,
                               **{**FAST, "lora_targets": "q,k,v,o,gate,up,down"})
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    theirs = PeftModel.from_pretrained(hf(base), adapter).eval()
    assert isinstance(theirs.peft_config["default"], LoraConfig) and theirs.peft_config["default"].r == 4
    ours = llamita.load_model(base, dtype=torch.float32)
    load_adapter(ours, adapter)
    merged = llamita.LLM.load(base, dtype=torch.float32, adapter=adapter).model
    with torch.no_grad():
        expected = theirs(ids()).logits
        assert (expected - hf(base)(ids()).logits).abs().max() > 1e-3  # training changed the model
        assert (ours(ids()) - expected).abs().max() < 1e-4
        assert (merged(ids()) - expected).abs().max() < 1e-4


# Stanford Alpaca's prompt (its train.py, PROMPT_DICT["prompt_no_input"]), written out here.
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def test_first_step_loss_equals_transformers_and_peft(base, tmp_path):
    """Step 1's loss in metrics.jsonl is the token-mean cross entropy of the responses (and their
    EOS) that transformers + peft give for the same records: formatting, masking and the loss agree.
    All 4 records make the one batch, so their order does not matter; LoRA's B starts at zero, so
    this is also the base model's loss."""
    records = alpaca_records(4)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    llamita.finetune(base, data, tmp_path / "run", steps=1, batch_size=4, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                     lora_targets=",".join(targets), lr=1e-2, warmup=1, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and losses(tmp_path / "run") == [rows[0]["loss"]]

    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(hf(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)).eval()
    total, count = 0.0, 0
    for r in records:
        prompt = [tok.bos_token_id] + tok.encode(ALPACA.format(instruction=r["instruction"]), add_special_tokens=False)
        answer = tok.encode(r["output"], add_special_tokens=False) + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]  # position t predicts token t + 1
        target = labels[0, 1:]
        total += torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100],
                                                   reduction="sum").item()
        count += int((target != -100).sum())
    assert count == sum(len(tok.encode(r["output"], add_special_tokens=False)) + 1 for r in records)
    assert rows[0]["loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_llamita(tmp_path, rslora):
    ref = tiny_hf(11, **CONFIGS["gqa-tied"])
    ref.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(ref, LoraConfig(r=4, lora_alpha=7, target_modules=["k_proj", "o_proj", "up_proj"],
                                                lora_dropout=0.0, use_rslora=rslora, alpha_pattern={"up_proj": 3}))
    with torch.no_grad():  # B starts at zero: make it count
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    peft_model.eval().save_pretrained(tmp_path / "adapter")
    ours = llamita.load_model(tmp_path / "base", dtype=torch.float32)
    load_adapter(ours, tmp_path / "adapter")
    tokens = random_tokens(211)
    with torch.no_grad():
        expected = peft_model(tokens).logits
        assert (expected - tiny_hf(11, **CONFIGS["gqa-tied"])(tokens).logits).abs().max() > 1e-3
        assert (ours(tokens) - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_merge_matches_transformers_and_keeps_the_tokenizer(base, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    adapter = llamita.finetune(base, data, tmp_path / "run", steps=4, **FAST)
    assert cli.main(["merge", str(base), str(adapter), str(tmp_path / "merged")]) == 0
    merged = hf(tmp_path / "merged")
    with_adapter = llamita.LLM.load(base, dtype=torch.float32, adapter=adapter)
    with torch.no_grad():
        assert (merged(ids()).logits - with_adapter.model(ids())).abs().max() < 1e-4
    assert cli.main(["generate", "repite gato", "--model", str(base), "--adapter", str(adapter),
                     "--max-new-tokens", "3", "--temperature", "0"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = "repite gato"
    assert tok.encode(text, add_special_tokens=False) == with_adapter.tokenizer.encode(text)
    assert llamita.load_tokenizer(tmp_path / "merged").chat_template == with_adapter.tokenizer.chat_template


@pytest.mark.slow
def test_merge_of_the_default_gguf_model(default_gguf, tmp_path):
    """A GGUF base: the merged folder carries tokenizer.json and the chat template from the GGUF."""
    model = llamita.load_model(default_gguf, dtype=torch.float32)
    q = model.layers[0].self_attn.o_proj  # q_proj's shape: dim x dim
    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(2, q.in_features, generator=g),
               f"{prefix}.lora_B.weight": torch.randn(q.out_features, 2, generator=g)}
    (tmp_path / "adapter").mkdir()
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    llamita.formats.export.merge(default_gguf, tmp_path / "adapter", tmp_path / "merged")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    load_adapter(model, tmp_path / "adapter")
    tokens = random_tokens(1000, seed=2)
    with torch.no_grad():
        assert (theirs(tokens).logits - model(tokens)).abs().max() < 1e-3
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ours = llamita.load_tokenizer(default_gguf)
    text = "¿Dónde está la biblioteca? 1234 <|im_start|>"
    assert tok.encode(text, add_special_tokens=False) == ours.encode(text, special=True)
    assert tok.encode(text, add_special_tokens=False, split_special_tokens=True) == ours.encode(text)
    assert tok.chat_template == ours.chat_template and tok.eos_token == "<|im_end|>"


def test_adapter_for_another_base_is_refused(base, tmp_path):
    other = tiny_hf(1, **CONFIGS["multi-head-untied"])
    peft_model = get_peft_model(other, LoraConfig(r=2, target_modules=["k_proj"]))
    peft_model.save_pretrained(tmp_path / "other")  # k_proj: 64x64 there, 32x64 (2 kv heads) here
    model = llamita.load_model(base, dtype=torch.float32)
    with pytest.raises(LlamitaError, match=r"adapter_model.safetensors: model.layers.0.self_attn.k_proj lora_A "
                                           r"\(2, 64\) / lora_B \(64, 2\) do not fit a 32x64 layer: "
                                           r"an adapter for a different base"):
        load_adapter(model, tmp_path / "other")
    deeper = tiny_hf(1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=5,
                     vocab_size=300)  # the same shapes, two layers more
    get_peft_model(deeper, LoraConfig(r=2, target_modules=["v_proj"])).save_pretrained(tmp_path / "deeper")
    with pytest.raises(LlamitaError, match=r"module 'model.layers.3.self_attn.v_proj', which this model does not have"):
        load_adapter(model, tmp_path / "deeper")


def test_bad_adapter_files(base, tmp_path):
    model = llamita.load_model(base, dtype=torch.float32)
    with pytest.raises(LlamitaError, match="not a PEFT adapter directory"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}')
    with pytest.raises(LlamitaError, match="adapter_config.json: field 'use_dora' is True"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(LlamitaError, match="field 'peft_type' is 'IA3'"):
        load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    save_file({"base_model.model.model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(LlamitaError, match="tensor 'base_model.model.model.embed_tokens.weight' is not a LoRA A/B"):
        load_adapter(model, tmp_path)
    with pytest.raises(LlamitaError, match="not a PEFT adapter directory"):
        llamita.LLM.load(base, adapter=tmp_path / "nowhere")


def test_lora_dropout_one_mask_per_call_and_the_right_rate():
    torch.manual_seed(0)
    drop = LoRADropout(0.05)  # one per layer: q, k and v's adapters (one fused layer) see one mask
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - 0.05)), rtol=1e-4, atol=0)  # unbiased
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask and scale
    other = drop(torch.ones(1000, 1000))
    assert not torch.equal(other, y)  # a new input draws a new mask
    drop.eval()
    assert drop(x) is x
