"""Generation: greedy parity with transformers, batching, streaming, stop strings, the CLI."""

from __future__ import annotations

import io
import sys
import time

import pytest
import torch

from helpers import run_cli
from llamita import LlamitaError
from llamita.generate import Request, StopMatcher, generate
from llamita.llm import LLM
from llamita.sampling import MAX_STOP_CHARS, MAX_STOPS, SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three fruits."}],
    [{"role": "user", "content": "Escribe una frase sobre el mar."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],
]


def greedy_ids(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    requests = [llm.request(p, temperature=0, max_new_tokens=n) for p in prompts]
    for _ in generate(llm.model, requests):
        pass
    return [r.output_ids + ([] if r.finish_reason == "length" else ["<stop>"]) for r in requests]


@pytest.mark.slow
def test_greedy_matches_transformers(default_llm, hf_default_model):
    for messages in CHATS:
        prompt = default_llm.encode_chat(messages)
        ours = greedy_ids(default_llm, [prompt], 48)[0]
        with torch.no_grad():
            out = hf_default_model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False,
                                            eos_token_id=sorted(default_llm.stop_ids), pad_token_id=2)
        theirs = out[0, len(prompt):].tolist()
        if theirs[-1] in default_llm.stop_ids:  # transformers keeps the stop token; we report it as "<stop>"
            theirs[-1] = "<stop>"
        assert ours == theirs, messages


@pytest.mark.slow
def test_batch_equals_single(default_llm):
    prompts = [default_llm.encode_chat(m) for m in CHATS[:3]] + [default_llm.encode("Once upon a time")]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    batched = greedy_ids(default_llm, prompts, 24)
    alone = [greedy_ids(default_llm, [p], 24)[0] for p in prompts]
    assert batched == alone
    texts = default_llm.generate_batch(["Once upon a time", "The capital of Italy is"], temperature=0,
                                       max_new_tokens=12)
    assert texts == [default_llm.generate(p, temperature=0, max_new_tokens=12)
                     for p in ["Once upon a time", "The capital of Italy is"]]


@pytest.mark.slow
def test_chat_next_turn_runs_only_its_new_tokens(default_llm):
    """An LLM keeps its KV cache between calls (the model holds none in between): a chat's next
    turn feeds the model only what the cache lacks, and answers as ``generate`` in a fresh cache."""
    llm = LLM(default_llm.model, default_llm.tokenizer)  # a cache of its own
    first = [{"role": "user", "content": "Name a large animal that lives in the Andes."}]
    second = first + [{"role": "assistant", "content": llm.chat(first, temperature=0, max_new_tokens=12)},
                      {"role": "user", "content": "And a small one?"}]
    fed = []
    hook = llm.model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    try:
        reply = llm.chat(second, temperature=0, max_new_tokens=12)
    finally:
        hook.remove()
    assert list(llm.model.buffers()) == []  # the model holds no cache between calls: the LLM does
    prompt = llm.encode_chat(second)
    assert fed[0] <= len(prompt) - len(llm.encode_chat(first))  # the prefill: the new turn only
    fresh = llm.request(prompt, temperature=0, max_new_tokens=12)
    assert reply == "".join(text for _, text in generate(llm.model, [fresh]))


@pytest.mark.slow
def test_same_seed_same_text(default_llm):
    kw = dict(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=20)
    a = default_llm.chat(CHATS[2], seed=7, **kw)
    assert a == default_llm.chat(CHATS[2], seed=7, **kw)
    assert a != default_llm.chat(CHATS[2], seed=8, **kw) or a != default_llm.chat(CHATS[2], seed=9, **kw)


def fed(llm: LLM, text: str, stop: list[str]) -> tuple[list[str], Request]:
    """Push the ids of ``text`` through a Request as if the model had generated them."""
    r = llm.request([1], max_new_tokens=1000, stop=stop)
    chunks = []
    for token in llm.tokenizer.encode(text):
        chunks.append(r.accept(token, max_seq_len=10_000))
        if r.finish_reason:
            break
    return chunks, r


@pytest.mark.parametrize("text", ["¿Qué tal? Él comió piña en Málaga — ¡olé! 🦙🎉👩‍👩‍👧 fin",
                                  "naïve café ñandú 😀😀 x"])
def test_stream_chunks_join_to_the_text(default_llm, text):
    chunks, r = fed(default_llm, text, stop=[])
    chunks.append(r.decoder.flush() + r.matcher.flush())
    assert "".join(chunks) == text == default_llm.tokenizer.decode(r.output_ids)
    assert not any("\ufffd" in c for c in chunks)


@pytest.mark.slow
def test_stream_of_a_real_generation_joins_to_decode(default_llm):
    request = default_llm.request(default_llm.encode_chat(CHATS[2]), temperature=0, max_new_tokens=40)
    chunks = [text for _, text in generate(default_llm.model, [request])]
    assert len(chunks) > 5
    assert "".join(chunks) == default_llm.tokenizer.decode(request.output_ids)


def test_stop_string_split_across_tokens(default_llm):
    text = "The quick brown fox jumps over the lazy dog"
    ids = default_llm.tokenizer.encode(text)
    pieces = [default_llm.tokenizer.decode([i]) for i in ids]
    assert "own fo" not in pieces  # the stop string spans several tokens
    chunks, r = fed(default_llm, text, stop=["own fo"])
    assert r.finish_reason == "stop"
    assert "".join(chunks) == "The quick br"


@pytest.mark.slow
def test_stop_string_in_model_output(default_llm):
    full = default_llm.generate("The capital of France is", temperature=0, max_new_tokens=30)
    stop = full[10:16]
    cut = default_llm.generate("The capital of France is", temperature=0, max_new_tokens=30, stop=[stop])
    assert cut == full[: full.index(stop)]
    streamed = "".join(default_llm.stream("The capital of France is", temperature=0, max_new_tokens=30, stop=[stop]))
    assert streamed == cut


def test_stop_matcher_holds_back_only_possible_starts():
    m = StopMatcher(["END"])
    assert m.push("abc E") == ("abc ", False)
    assert m.push("N") == ("", False)
    assert m.push("x") == ("ENx", False)
    assert m.push("yy END zz") == ("yy ", True)


@pytest.mark.slow
def test_eos_stops_with_reason_stop_and_length_otherwise(default_llm):
    prompt = default_llm.encode_chat(CHATS[0])
    short = default_llm.request(prompt, temperature=0, max_new_tokens=3)
    long = default_llm.request(prompt, temperature=0, max_new_tokens=100)
    list(generate(default_llm.model, [short, long]))
    assert short.finish_reason == "length" and len(short.output_ids) == 3
    assert long.finish_reason == "stop" and len(long.output_ids) < 100


def test_prompt_longer_than_context(default_llm):
    too_long = [5] * (default_llm.model.config.max_seq_len + 10)
    with pytest.raises(LlamitaError, match="context window"):
        default_llm.request(too_long)
    r = default_llm.request(too_long, truncate=True, max_new_tokens=1)
    assert len(r.prompt_ids) == default_llm.model.config.max_seq_len - 1


def test_bad_sampling_options():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=0), dict(max_new_tokens=0), dict(stop=[""])):
        with pytest.raises(LlamitaError):
            SamplingParams(**bad)


@pytest.mark.slow
def test_cli_generate(default_llm):
    out = run_cli("generate", "The capital of France is", "--quantize", "none", "--temperature", "0",
                  "--max-new-tokens", "12")  # float32, as default_llm
    assert out.returncode == 0, out.stderr
    assert out.stdout == default_llm.generate("The capital of France is", temperature=0, max_new_tokens=12) + "\n"


@pytest.mark.slow
def test_cli_chat_piped(default_llm, monkeypatch, capsys):
    """``chat`` in process, its stdin piped text (``python -m llamita chat`` is test_finetune_then_chat.py's)."""
    from llamita import cli

    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Spain?\n"))
    assert cli.main(["chat", "--quantize", "none", "--temperature", "0", "--max-new-tokens", "16",
                     "--system", "You are brief."]) == 0
    lines = capsys.readouterr().out.splitlines()
    system = {"role": "system", "content": "You are brief."}
    first = default_llm.chat([system, {"role": "user", "content": "What is the capital of France?"}],
                             temperature=0, max_new_tokens=16)
    second = default_llm.chat([system, {"role": "user", "content": "What is the capital of France?"},
                               {"role": "assistant", "content": first}, {"role": "user", "content": "And of Spain?"}],
                              temperature=0, max_new_tokens=16)
    assert "\n".join(lines) == f"{first}\n{second}"


@pytest.mark.slow
def test_repetition_penalty_covers_prompt_and_output(default_llm):
    r = default_llm.request(default_llm.encode("one one one one"), temperature=0, max_new_tokens=8,
                            repetition_penalty=1.3)
    list(generate(default_llm.model, [r]))
    assert r.seen.shape == (default_llm.model.config.vocab_size,)
    assert r.seen[r.prompt_ids + r.output_ids].all() and int(r.seen.sum()) == len(set(r.prompt_ids + r.output_ids))
    plain = default_llm.generate("one one one one", temperature=0, max_new_tokens=8)
    assert default_llm.tokenizer.decode(r.output_ids) != plain


@pytest.mark.slow
def test_repetition_penalty_matches_transformers(default_llm, hf_default_model, hf_smol):
    """Greedy decoding with a repetition penalty gives transformers' text for the same prompt ids
    (CTRL's rule over the prompt and the output, as transformers applies it)."""
    prompt = "1, 2, 3, 4, 5,"  # unpenalised, greedy decoding keeps counting
    ids = hf_smol(prompt)["input_ids"]
    ours = default_llm.generate(prompt, temperature=0, repetition_penalty=1.3, max_new_tokens=24)
    with torch.no_grad():
        out = hf_default_model.generate(torch.tensor([ids]), do_sample=False, repetition_penalty=1.3,
                                        max_new_tokens=24, pad_token_id=2)
    new = out[0, len(ids):].tolist()
    assert len(new) == 24 and not set(new) & set(hf_smol.all_special_ids)  # no stop: both ran 24 tokens
    assert ours == hf_smol.decode(new)
    assert ours != default_llm.generate(prompt, temperature=0, max_new_tokens=24)  # the penalty changed the text


def test_stop_matcher_finds_the_first_stop_across_tokens():
    m = StopMatcher(["abcd", "cx"])
    assert m.push("zab") == ("z", False)  # "ab" may start "abcd"
    assert m.push("c") == ("", False)
    assert m.push("x") == ("ab", True)  # "cx" ends first: the text before it
    assert StopMatcher(["aaab"]).push("aaaaab") == ("aa", True)  # a partial match that fails falls back


def stream_cost(stops: list[str], tokens: int = 200) -> float:
    """Seconds to push ``tokens`` tokens of "a"s through a StopMatcher (best of 3)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        m = StopMatcher(stops)
        for _ in range(tokens):
            m.push("aaaa")
        best = min(best, time.perf_counter() - start)
    return best


def test_stop_matcher_cost_per_token_does_not_grow_with_the_stops_length():
    """Long stops that the text keeps almost matching ("aaa...ab") cost a token O(length²) before:
    16 stops of 60,000 characters stalled every other request on the engine thread."""
    short = stream_cost(["a" * 9 + str(i) for i in range(MAX_STOPS)])
    long = stream_cost(["a" * (MAX_STOP_CHARS - 1) + str(i) for i in range(MAX_STOPS)])
    assert long < 4 * short, (long, short)


def test_stop_strings_are_bounded():
    with pytest.raises(LlamitaError, match=f"at most {MAX_STOPS} strings"):
        SamplingParams(stop=["a"] * (MAX_STOPS + 1))
    with pytest.raises(LlamitaError, match=f"at most {MAX_STOP_CHARS} characters"):
        SamplingParams(stop=["a" * (MAX_STOP_CHARS + 1)])


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale's stdin; the C locale's
def test_cli_refuses_stdin_that_is_not_utf8(default_llm, monkeypatch, capsys, command, errors):
    """Latin-1 bytes on stdin ended in a UnicodeDecodeError's traceback, or as surrogates in the tokenizer's."""
    from llamita import cli

    monkeypatch.setattr(cli, "load_llm", lambda args: default_llm)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n"), "utf-8", errors))
    assert cli.main([command, "--max-new-tokens", "2"]) == 2
    error = "llamita: error: stdin is not UTF-8 text: byte b'\\xe9' (invalid continuation byte)\n"
    assert capsys.readouterr().err == error


def test_cli_refuses_a_prompt_that_is_not_unicode(default_llm, monkeypatch, capsys):
    """An argument of undecodable bytes reaches Python as surrogates, which the tokenizer failed on."""
    from llamita import cli

    monkeypatch.setattr(cli, "load_llm", lambda args: default_llm)
    assert cli.main(["generate", "caf\udce9", "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == ("llamita: error: cannot tokenize: an unpaired surrogate (U+DCE9) at character 3 "
                                       "is not valid Unicode text\n")
