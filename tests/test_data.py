"""Records -> ids and labels: which tokens carry loss (checked on token ids), packing, data order,
and one-line errors for bad data."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import llama_cpp_path
from llamita.data import IGNORE, Example, collate, encode_record, load_dataset, order, pack, read_records, split
from llamita.errors import LlamitaError
from llamita.tokenizer import Tokenizer, load_tokenizer

STANFORD = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\nTraduce al inglés\n\n### Response:")
CHAT = {"messages": [{"role": "system", "content": "Responde en español."},
                     {"role": "user", "content": "Hola"}, {"role": "assistant", "content": "¿Qué tal?"},
                     {"role": "user", "content": "Bien"}, {"role": "assistant", "content": "Me alegro."}]}


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def llama() -> Tokenizer:
    return load_tokenizer(llama_cpp_path("models/ggml-vocab-llama-spm.gguf"))


def learned(ex: Example) -> list[int]:
    return [i for i, label in zip(ex.ids, ex.labels) if label != IGNORE]


def test_alpaca_loss_covers_only_the_response(smol):
    ex = encode_record(smol, {"instruction": "Traduce al inglés", "input": "", "output": "Good morning"}, "r")
    prompt = smol.encode(STANFORD)  # Stanford Alpaca's prompt text, written out here
    answer = smol.encode("Good morning") + [smol.eos_id]
    assert ex.ids == prompt + answer
    assert ex.labels == [IGNORE] * len(prompt) + answer
    everything = encode_record(smol, {"instruction": "Traduce al inglés", "output": "Good morning"}, "r",
                               train_on_prompt=True)
    assert everything.labels == everything.ids == ex.ids


def test_chat_template_loss_covers_assistant_turns(smol):
    ex = encode_record(smol, CHAT, "r", template="chatml")
    text = ("<|im_start|>system\nResponde en español.<|im_end|>\n<|im_start|>user\nHola<|im_end|>\n"
            "<|im_start|>assistant\n¿Qué tal?<|im_end|>\n<|im_start|>user\nBien<|im_end|>\n"
            "<|im_start|>assistant\nMe alegro.<|im_end|>\n")
    assert ex.ids == smol.encode(text, special=True)  # the template's markup: control tokens
    im_end = smol.special_tokens["<|im_end|>"]
    newline = smol.encode("\n")
    assert learned(ex) == smol.encode("¿Qué tal?") + [im_end] + newline + smol.encode("Me alegro.") + [im_end] + newline
    assert encode_record(smol, CHAT, "r", template="chatml", train_on_prompt=True).labels == ex.ids
    # The checkpoint's own (jinja) template: the spans are the same answers.
    auto = encode_record(smol, CHAT, "r", template="auto")
    assert learned(auto) == learned(ex)


def test_llama2_template_loss_covers_answers_and_eos(llama):
    ex = encode_record(llama, CHAT, "r", template="llama-2")
    first = llama.encode("[INST] <<SYS>>\nResponde en español.\n<</SYS>>\n\nHola [/INST] ¿Qué tal? ", bos=True,
                         eos=True, special=False)
    second = llama.encode("[INST] Bien [/INST] Me alegro. ", bos=True, eos=True, special=False)
    assert ex.ids == first + second  # Meta's chat_completion, turn by turn
    assert llama.decode(learned(ex), special=True) == "¿Qué tal? </s>Me alegro. </s>"
    assert learned(ex)[-1] == llama.eos_id


def test_sharegpt_equals_chat(smol):
    share = {"conversations": [{"from": m["role"].replace("user", "human").replace("assistant", "gpt"),
                                "value": m["content"]} for m in CHAT["messages"]]}
    a, b = encode_record(smol, share, "r", "chatml"), encode_record(smol, CHAT, "r", "chatml")
    assert (a.ids, a.labels) == (b.ids, b.labels)


def test_json_array_jsonl_truncation_and_split(smol, tmp_path):
    records = [{"instruction": f"di {i}", "output": "sí " * (i * 8)} for i in range(1, 6)]  # 50 to 114 tokens
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    a = load_dataset(tmp_path / "a.json", smol, max_length=60)
    b = load_dataset(tmp_path / "b.jsonl", smol, max_length=60)
    assert [e.ids for e in a.examples] == [e.ids for e in b.examples]
    full = load_dataset(tmp_path / "a.json", smol, max_length=10_000)
    assert a.truncated == sum(len(e.ids) > 60 for e in full.examples) == 4
    assert [e.ids[:60] for e in full.examples] == [e.ids for e in a.examples]
    train, val = split(a, 0.4, seed=0)
    assert (len(train), len(val)) == (3, 2)
    assert sorted(map(tuple, (e.ids for e in train.examples + val.examples))) == sorted(
        tuple(e.ids) for e in a.examples)


def test_text_format_learns_every_token(smol, tmp_path):
    (tmp_path / "t.txt").write_text("En un lugar de la Mancha, de cuyo nombre no quiero acordarme " * 20)
    data = load_dataset(tmp_path / "t.txt", smol, format="text", max_length=32)
    assert all(e.labels == e.ids and len(e.ids) <= 32 for e in data.examples)
    assert sum(len(e.ids) for e in data.examples) == len(smol.encode((tmp_path / "t.txt").read_text(), eos=True))


def test_pack_keeps_records_apart():
    a, b, c = Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5], [IGNORE, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])
    packed = pack([a, b, c], max_length=6)
    assert [p.ids for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert packed[0].positions == [0, 1, 2, 0, 1] and packed[0].segments == [0, 0, 0, 1, 1]
    batch = collate(packed)
    mask = batch["mask"][0, 0]
    assert mask[4].tolist() == [False, False, False, True, True]  # token 5 sees only record b
    assert mask[2].tolist() == [True, True, True, False, False]
    assert batch["labels"][1].tolist() == [6, 7, 8, 9, IGNORE]
    assert batch["positions"][1].tolist() == [0, 1, 2, 3, 0]


def test_order_is_seeded_epochs():
    first = order(5, 0, 10, seed=3)
    assert sorted(first[:5]) == sorted(first[5:]) == list(range(5)) and first[:5] != first[5:]
    assert order(5, 7, 6, seed=3) == order(5, 0, 13, seed=3)[7:]
    assert order(5, 0, 5, seed=4) != first[:5]


def test_collate_pads_right_without_loss():
    batch = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["ids"].dtype == torch.long and "mask" not in batch


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n', r"b.jsonl:2: not valid JSON"),
    ('{"instruction": "a"}\n', r"b.jsonl:1: missing field 'output'"),
    ('{"instruction": ["a"], "output": "b"}\n', r"b.jsonl:1: field 'instruction' must be a string, not list"),
    ('\n\n', r"b.jsonl: no records \(the dataset is empty\)"),
    ('[1]', r"b.jsonl: record 0: expected a JSON object, not int"),
    ('{"text": "x"}\n', r"b.jsonl:1: a record needs 'instruction'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
     r"b.jsonl:1: messages\[1\]: field 'role' is 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', r"b.jsonl:1: field 'messages' has no assistant turn"),
    ('{"conversations": [{"from": "human", "value": 3}]}\n', r"b.jsonl:1: conversations\[0\]: field 'value' must be"),
    ('{"instruction": "a", "output": "b\\ud800"}\n',  # valid JSON, not Unicode: the tokenizer failed on it
     r"b.jsonl:1: field 'output': an unpaired surrogate \(U\+D800\) at character 1"),
    ('{"messages": [{"role": "user", "content": "\\udc00"}, {"role": "assistant", "content": "b"}]}\n',
     r"b.jsonl:1: messages\[0\]: field 'content': an unpaired surrogate \(U\+DC00\)"),
])
def test_bad_records(smol, tmp_path, content, message):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(LlamitaError, match=message):
        load_dataset(tmp_path / "b.jsonl", smol, template="chatml")


def test_bad_sources_and_templates(smol, tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(LlamitaError, match="unknown chat template 'vicuna'"):
        load_dataset(tmp_path / "ok.jsonl", smol, template="vicuna")
    with pytest.raises(LlamitaError, match="unknown data format 'csv'"):
        load_dataset(tmp_path / "ok.jsonl", smol, format="csv")
    with pytest.raises(LlamitaError, match="ok.jsonl:1: a alpaca record in data read as --format chat"):
        load_dataset(tmp_path / "ok.jsonl", smol, format="chat")
    with pytest.raises(LlamitaError, match="missing.json: no such file"):
        read_records(tmp_path / "missing.json")
    # A Hub name offline, or without the optional extra: a clear error either way.
    with pytest.raises(LlamitaError, match="bertin-project/alpaca-spanish"):
        read_records("bertin-project/alpaca-spanish")


@pytest.mark.slow
def test_packed_forward_equals_each_record_alone(default_model):
    """Packed records attend only within themselves: their logits equal each record's own forward."""
    records = [[5, 17, 300, 42], [9, 1000, 7], [123, 4, 56, 78, 90]]
    examples = [Example(ids, list(ids), None, None) for ids in records]
    batch = collate(pack(examples, max_length=16))
    assert batch["ids"].shape == (1, 12)
    with torch.no_grad():
        packed = default_model(batch["ids"], batch["positions"], mask=batch["mask"])[0]
        alone = torch.cat([default_model(torch.tensor([ids]))[0] for ids in records])
    assert (packed - alone).abs().max().item() < 1e-4
