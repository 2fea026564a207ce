"""Structured output: JSON that a schema accepts, by llguidance's token masks.

Outputs are checked with ``json.loads`` and the ``jsonschema`` package; the vocabulary's bytes
against llguidance's own reading of transformers' tokenizer; the allowed first tokens against JSON
parsing. Nothing here compares with values our own code produced.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import jsonschema  # a missing test dependency fails the module loudly: no skips
import llguidance
import llguidance.hf
import pytest
import torch
import transformers

from llamita import cli
from llamita.constrain import ANY_OBJECT, SchemaError, json_constraint, json_grammar, ll_tokenizer
from llamita.serve.app import create_app

NAME = {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"}
SCHEMAS = [
    {  # required fields, bounded numbers
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "employed": {"type": "boolean"}},
        "required": ["name", "age", "employed"], "additionalProperties": False,
    },
    {  # nested objects
        "type": "object",
        "properties": {
            "person": {"type": "object", "properties": {"name": NAME, "city": {"type": "string", "maxLength": 16}},
                       "required": ["name", "city"], "additionalProperties": False},
            "address": {"type": "object",
                        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                       "geo": {"type": "object",
                                               "properties": {"floor": {"type": "integer", "minimum": 0,
                                                                        "maximum": 99}},
                                               "required": ["floor"], "additionalProperties": False}},
                        "required": ["zip", "geo"], "additionalProperties": False},
        },
        "required": ["person", "address"], "additionalProperties": False,
    },
    {  # enums and arrays
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 99},
                                 "minItems": 1, "maxItems": 3},
                       "unit": {"type": "string", "enum": ["cm", "in"]}},
        "required": ["color", "sizes", "unit"], "additionalProperties": False,
    },
    {  # an array of objects, an optional field
        "type": "object",
        "properties": {"items": {"type": "array", "maxItems": 2,
                                 "items": {"type": "object",
                                           "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                          "tag": {"enum": ["a", "b", "c"]}},
                                           "required": ["id", "tag"], "additionalProperties": False}},
                       "status": {"enum": ["ok", "failed"]},
                       "note": {"type": "string", "maxLength": 12}},
        "required": ["items", "status"], "additionalProperties": False,
    },
]
UNSUPPORTED = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
ASK = [{"role": "user", "content": "Describe something as JSON."}]


def allowed_ids(constraint, vocab: int) -> set[int]:
    return set(torch.isfinite(constraint.mask(torch.zeros(vocab))).nonzero()[:, 0].tolist())


# -- the vocabulary and the mask -----------------------------------------------------------------
@pytest.mark.slow  # transformers reads both vocabularies from GGUF: half a minute
def test_token_bytes_are_llguidance_reading_of_the_hf_tokenizer(smol, hf_smol, llama_vocab):
    """Our bytes per token (byte-level BPE, SentencePiece) against llguidance's own reading of
    transformers' tokenizers for the same vocabularies."""
    from llamita.tokenizer import load_tokenizer

    hf_llama = transformers.AutoTokenizer.from_pretrained(str(llama_vocab.parent), gguf_file=llama_vocab.name)
    for ours, theirs in [(smol, hf_smol), (load_tokenizer(llama_vocab), hf_llama)]:
        mine, ref = ll_tokenizer(ours), llguidance.hf.from_tokenizer(theirs)
        assert mine.vocab_size == ref.vocab_size == ours.vocab_size
        differ = [i for i in range(ours.vocab_size) if mine.decode_bytes([i]) != ref.decode_bytes([i])
                  or mine.is_special_token(i) != ref.is_special_token(i)]
        assert not differ, [ours.id_to_token(i) for i in differ[:5]]
    assert ll_tokenizer(smol) is ll_tokenizer(smol)  # built once


def starts_an_object(text: str) -> bool:
    """Whether some closing text makes ``text`` a JSON object (the closings a single token can need)."""
    for closing in ("", "}", '"}', '":0}', ":0}", "0}"):
        try:
            if isinstance(json.loads(text + closing), dict):
                return True
        except json.JSONDecodeError:
            pass
    return False


def test_first_tokens_of_any_object_are_those_that_start_one(smol):
    constraint = json_constraint(smol, ANY_OBJECT, stop_ids=[smol.eos_id])
    allowed = allowed_ids(constraint, smol.vocab_size)
    texts = {i: smol.decode([i]) for i in range(smol.vocab_size)}
    assert all(starts_an_object(texts[i]) for i in allowed)  # nothing else
    # ... and every one that does, but for whitespace (which the grammar leaves out by choice).
    assert {i for i, t in texts.items() if not any(c.isspace() for c in t) and starts_an_object(t)} <= allowed
    assert smol.eos_id not in allowed and {"{", '{"'} <= {texts[i] for i in allowed}


def test_stop_tokens_only_once_complete_and_padding_masked(smol):
    stop = smol.special_tokens["<|endoftext|>"]  # a stop token that is not the tokenizer's EOS (<|im_end|>)
    number = json_constraint(smol, {"type": "integer"}, stop_ids=[stop])
    assert stop not in allowed_ids(number, smol.vocab_size)
    number.advance(smol.encode("7")[0])
    after = allowed_ids(number, smol.vocab_size)
    assert stop in after and smol.eos_id not in after and not number.done  # 7 may go on: 71
    assert smol.encode("1")[0] in after
    padded = number.mask(torch.zeros(smol.vocab_size + 64))
    assert torch.isinf(padded[smol.vocab_size:]).all()
    whole = json_constraint(smol, ANY_OBJECT, stop_ids=[stop])
    whole.advance(smol.encode("{}")[0])
    assert whole.done


def test_unsupported_schema_is_named():
    with pytest.raises(SchemaError, match=r"^json_schema: .*\bnot\b") as e:
        json_grammar(UNSUPPORTED)
    assert "\n" not in str(e.value)
    with pytest.raises(SchemaError, match="Unknown format"):
        json_grammar({"type": "string", "format": "no-such-format"})
    with pytest.raises(SchemaError, match="not list"):
        json_grammar([{"type": "object"}])


# -- Python and the CLI --------------------------------------------------------------------------
def test_chat_with_a_schema_validates(default_llm):
    schema = SCHEMAS[2]
    reply = default_llm.chat(ASK, json_schema=schema, temperature=1, top_p=1, seed=0, max_new_tokens=64)
    jsonschema.validate(json.loads(reply), schema)


@pytest.mark.slow  # loads the model in process: about 15 s
def test_cli_replies_in_the_schema(tmp_path: Path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS[0]))
    assert cli.main(["generate", "--json-schema", str(schema), "--temperature", "1", "--seed", "2",
                     "--max-new-tokens", "64", "A person as JSON:"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMAS[0])


def test_cli_names_a_bad_schema_file_before_loading(tmp_path: Path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(UNSUPPORTED))
    assert cli.main(["generate", "--json-schema", str(bad), "--model", str(tmp_path / "absent"), "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llamita: error: --json-schema {bad}: ") and "not" in err and "\n" not in err
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    assert cli.main(["chat", "--json-schema", str(listed)]) == 2
    assert str(listed) in capsys.readouterr().err


# -- the server ----------------------------------------------------------------------------------
async def post_all(llm, bodies: list[tuple[str, dict]], **options) -> tuple[list[httpx.Response], dict[str, float]]:
    """``bodies`` (route, body) sent at once to the app in process; the answers and the engine's counts."""
    app = create_app(llm, **{"max_batch": 32, "max_seq_len": 512, **options})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://llamita", timeout=600) as client:
            answers = await asyncio.gather(*(client.post(route, json=body) for route, body in bodies))
    m = app.state.engine.metrics
    return list(answers), {"decode_steps": m.decode_steps, "generated": m.generated_tokens}


def schema_format(i: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"schema{i}", "schema": SCHEMAS[i], "strict": True}}


@pytest.mark.slow
def test_twenty_sampled_completions_batched_all_validate(default_llm):
    """4 schemas x 5 seeds at temperature 1, sent together (and a free greedy request beside them):
    each parses and validates; they share decode passes; the free one is untouched by the masks."""
    bodies = [("/v1/chat/completions", {"messages": ASK, "temperature": 1, "top_p": 1, "seed": seed,
                                        "max_tokens": 160, "response_format": schema_format(i)})
              for i in range(len(SCHEMAS)) for seed in range(5)]
    free = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    answers, counts = asyncio.run(post_all(default_llm, bodies + [("/v1/completions", free)]))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    for (_, body), answer in zip(bodies, answers):
        choice = answer.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), body["response_format"]["json_schema"]["schema"])
    assert answers[-1].json()["choices"][0]["text"] == default_llm.generate("Once upon a time", temperature=0,
                                                                            max_new_tokens=24)
    assert counts["decode_steps"] < counts["generated"] / 5, counts


def test_json_object_mode_and_refusals(default_llm):
    ok = {"messages": ASK, "temperature": 1, "seed": 7, "max_tokens": 160, "n": 2,
          "response_format": {"type": "json_object"}}
    text = {"prompt": "Hi", "max_tokens": 2, "temperature": 0, "response_format": {"type": "text"}}
    unsupported = {"messages": ASK, "response_format": {"type": "json_schema",
                                                        "json_schema": {"name": "u", "schema": UNSUPPORTED}}}
    missing = {"messages": ASK, "response_format": {"type": "json_schema"}}
    not_a_schema = {"messages": ASK, "response_format": {"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": "object"}}}
    routes = ["/v1/chat/completions", "/v1/completions"] + ["/v1/chat/completions"] * 3
    answers, _ = asyncio.run(post_all(default_llm, list(zip(routes, [ok, text, unsupported, missing, not_a_schema]))))
    assert answers[0].status_code == 200, answers[0].text
    for choice in answers[0].json()["choices"]:
        assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)
    assert answers[1].status_code == 200 and answers[1].json()["choices"][0]["text"] == default_llm.generate(
        "Hi", temperature=0, max_new_tokens=2)
    error = answers[2].json()["error"]
    assert answers[2].status_code == 400 and error["param"] == "response_format"
    assert error["message"].startswith("response_format.json_schema.schema: ") and '"not"' in error["message"]
    for answer in answers[3:]:
        assert answer.status_code == 400 and answer.json()["error"]["param"].startswith("response_format")
