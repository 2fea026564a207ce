"""Speculative decoding: greedy output identical to plain greedy decoding whatever the draft proposes,
sampled output distributed as the target's (chi-square against transformers' probabilities), the
rejection rule against hand-computed cases, the CLI flags and the vocabulary check."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_base
from llamita import LlamitaError
from llamita.cache import KVCache
from llamita.generate import LookupDrafter, ModelDrafter, Request, SpeculationStats, generate, self_int4, speculate
from llamita.llm import LLM
from llamita.sampling import SamplingParams, acceptance, residual, verify_draft

PROMPTS = ["gato casa perro gato casa", "below is an instruction response below is an",
           "repite la palabra: agua verde agua", "fish big house cat fish big"]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A random tiny Llama (int4-quantizable: dims multiples of 32) with a small BPE tokenizer."""
    return tiny_base(tmp_path_factory.mktemp("target"), seed=0, intermediate_size=96)


@pytest.fixture(scope="module")
def tiny(target_dir) -> LLM:
    return LLM.load(target_dir, quantize="none")


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """Another random tiny Llama with the same tokenizer: a draft that is mostly wrong."""
    return tiny_base(tmp_path_factory.mktemp("draft"), seed=5, intermediate_size=96, num_hidden_layers=1)


class Scripted:
    """A stub draft that proposes, after m output tokens, ``script[m:m + k]`` (for certain)."""

    def __init__(self, script: list[int]):
        self.script = script

    def propose(self, request: Request, k: int) -> tuple[list[int], None]:
        return self.script[len(request.output_ids): len(request.output_ids) + k], None


def plain(llm: LLM, prompt: list[int], stop_ids: frozenset[int] | None = None, **options) -> Request:
    r = Request(prompt, SamplingParams(**options), llm.stop_ids if stop_ids is None else stop_ids, llm.tokenizer)
    r.text = "".join(text for _, text in generate(llm.model, [r]))
    return r


def speculative(llm: LLM, prompt: list[int], drafter, k: int, stop_ids: frozenset[int] | None = None,
                **options) -> tuple[Request, SpeculationStats]:
    r = Request(prompt, SamplingParams(**options), llm.stop_ids if stop_ids is None else stop_ids, llm.tokenizer)
    stats = SpeculationStats()
    r.text = "".join(speculate(llm.model, KVCache(llm.model, 1, 256), r, drafter, k, stats))
    return r, stats


def same(a: Request, b: Request) -> bool:
    return (a.output_ids, a.finish_reason, a.text) == (b.output_ids, b.finish_reason, b.text)


def test_greedy_equals_plain_greedy_with_every_draft(tiny, other_dir):
    random_draft = ModelDrafter(LLM.load(other_dir, quantize="none").model)
    drafters = {"self-int4": ModelDrafter(self_int4(tiny.model)), "random model": random_draft,
                "lookup": LookupDrafter(3), "itself": ModelDrafter(tiny.model)}
    accepted = dict.fromkeys(drafters, 0)
    for text in PROMPTS:
        prompt = tiny.encode(text)
        want = plain(tiny, prompt, temperature=0, max_new_tokens=24)
        for name, drafter in drafters.items():
            for k in (1, 4):
                got, stats = speculative(tiny, prompt, drafter, k, temperature=0, max_new_tokens=24)
                assert same(got, want), (name, k, text)
                # every token but the prompt pass's, and the stop token (EOS) that is not in the output
                assert stats.tokens == len(want.output_ids) - 1 + (want.finish_reason == "stop")
                accepted[name] += stats.accepted
        assert "".join(tiny.stream(text, temperature=0, max_new_tokens=24)) == want.text  # no drafter: plain
    assert accepted["itself"] > accepted["self-int4"] > accepted["random model"]
    assert accepted["lookup"] > 0  # kept drafts: passes that gave several tokens


def test_always_right_and_always_wrong_drafts(tiny):
    prompt = tiny.encode(PROMPTS[0])
    want = plain(tiny, prompt, temperature=0, max_new_tokens=21)
    wrong = [(t + 1) % tiny.model.config.vocab_size for t in want.output_ids]
    got, stats = speculative(tiny, prompt, Scripted(wrong), 4, temperature=0, max_new_tokens=21)
    assert same(got, want)
    assert stats.accepted == 0 and stats.passes == 20 and stats.drafted > 0
    got, stats = speculative(tiny, prompt, Scripted(want.output_ids), 4, temperature=0, max_new_tokens=21)
    assert same(got, want)
    assert stats.acceptance == 1.0 and stats.passes == 4  # 20 tokens after the prompt's, 5 a pass
    assert stats.tokens_per_pass == 5.0
    got, stats = speculative(tiny, prompt, ModelDrafter(tiny.model), 4, temperature=0, max_new_tokens=21)
    assert same(got, want) and stats.acceptance == 1.0 and stats.passes == 4


def test_stop_token_and_stop_string_mid_draft(tiny):
    prompt = tiny.encode(PROMPTS[1])
    full = plain(tiny, prompt, temperature=0, max_new_tokens=30)
    # A token that first appears a few tokens in, made a stop token: plain decoding ends there.
    at = next(i for i, t in enumerate(full.output_ids) if i >= 4 and t not in full.output_ids[:i])
    stop_ids = frozenset({full.output_ids[at]})
    want = plain(tiny, prompt, stop_ids, temperature=0, max_new_tokens=30)
    assert want.finish_reason == "stop" and want.output_ids == full.output_ids[:at]
    for drafter in (Scripted(full.output_ids), ModelDrafter(tiny.model), ModelDrafter(self_int4(tiny.model))):
        got, _ = speculative(tiny, prompt, drafter, 8, stop_ids, temperature=0, max_new_tokens=30)
        assert same(got, want)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    want = plain(tiny, prompt, temperature=0, max_new_tokens=30, stop=[stop])
    assert want.finish_reason == "stop" and want.text == full.text[: full.text.index(stop)]
    got, stats = speculative(tiny, prompt, Scripted(full.output_ids), 8, temperature=0, max_new_tokens=30,
                             stop=[stop])
    assert same(got, want)
    assert stats.drafted > stats.accepted  # drafts past the stop string were proposed, and not taken


def test_llm_keeps_its_caches_right_across_calls(tiny):
    """A chat's next turn reuses the target's cache (its ``held`` is the fed tokens only, not the rejected
    drafts written past them) and the draft's."""
    spec = LLM(tiny.model, tiny.tokenizer, drafter=ModelDrafter(self_int4(tiny.model)), draft_tokens=3)
    first = [{"role": "user", "content": "gato casa perro"}]
    reply = spec.chat(first, temperature=0, max_new_tokens=12)
    assert reply == tiny.chat(first, temperature=0, max_new_tokens=12)
    assert spec.last_stats.passes > 0 and spec.last_stats.drafted > 0
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "agua verde"}]
    request = spec.request(spec.encode_chat(second), temperature=0, max_new_tokens=12)
    assert "".join(spec._run_one(request)) == tiny.chat(second, temperature=0, max_new_tokens=12)
    assert spec.cache.held[0] == request.fed_ids


# -- sampling keeps the target's distribution -------------------------------------------------------------

# df = 7 (8 outcomes): chi-square's 0.999 quantile, from a printed table (e.g. NIST/SEMATECH's).
CHI2_7_999 = 24.322


def target_probabilities(hf_model, prompt: list[int], steps: int, top_k: int) -> dict[tuple[int, ...], float]:
    """Every sequence of ``steps`` tokens among each step's ``top_k`` and its probability, by transformers."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for seq, prob in out.items():
            with torch.no_grad():
                logits = hf_model(torch.tensor([prompt + list(seq)])).logits[0, -1].double()
            top = logits.topk(top_k)
            for token, p in zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()):
                grown[seq + (token,)] = prob * p
        out = grown
    return out


class FixedDraft:
    """A stub draft drawing its tokens from a fixed distribution ``q`` (None: always proposing ``tokens``)."""

    def __init__(self, q: torch.Tensor | None, tokens: list[int] = ()):
        self.q, self.tokens = q, list(tokens)

    def propose(self, request: Request, k: int) -> tuple[list[int], torch.Tensor | None]:
        if self.q is None:
            return self.tokens[:k], None
        tokens = torch.multinomial(self.q, k, replacement=True, generator=request.generator).tolist()
        return tokens, self.q.expand(k, -1)


@pytest.mark.parametrize("draft", ["fixed q", "certain", pytest.param("self-int4", marks=pytest.mark.slow)])
def test_sampling_keeps_the_target_distribution(tiny, target_dir, draft):
    """Three tokens (top-k 2, so 8 outcomes) sampled 600 times with speculation (k = 2: the second token
    a draft's kept or replaced, the third a bonus token or a plain one), counted against
    transformers' probabilities for the target: chi-square with 7 degrees of freedom, fixed seeds."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    prompt = tiny.encode(PROMPTS[2])
    expected = target_probabilities(hf, prompt, 3, top_k=2)
    second = sorted({s[1] for s in expected})  # the tokens the target may say second
    outside = next(t for t in range(10) if t not in second)
    # For the certain draft, the less likely second token after the likelier first: often rejected.
    pairs = {s[:2]: sum(p for t, p in expected.items() if t[:2] == s[:2]) for s in expected}
    first = max({s[0] for s in expected}, key=lambda t: sum(p for s, p in pairs.items() if s[0] == t))
    unlikely = min((s for s in pairs if s[0] == first), key=pairs.get)[1]
    q = torch.zeros(tiny.model.config.vocab_size)
    others = [t for t in second if t != unlikely] + [outside]
    q[others] = 0.4 / len(others)
    q[unlikely] = 0.6  # more than the target gives it: kept with probability p / q < 1, the rest from the residual
    drafter = {"fixed q": FixedDraft(q),
               "certain": FixedDraft(None, [unlikely, outside]),
               "self-int4": ModelDrafter(self_int4(tiny.model))}[draft]
    counts = dict.fromkeys(expected, 0)
    total = SpeculationStats()
    n = 600
    for seed in range(n):
        r = Request(prompt, SamplingParams(temperature=1.0, top_k=2, top_p=1.0, max_new_tokens=3, seed=seed),
                    frozenset(), tiny.tokenizer)
        list(speculate(tiny.model, KVCache(tiny.model, 1, 64), r, drafter, 2, total))
        counts[tuple(r.output_ids)] += 1  # a sequence outside the top-2 tree raises KeyError
    chi2 = sum((counts[s] - n * p) ** 2 / (n * p) for s, p in expected.items())
    assert chi2 < CHI2_7_999, (counts, expected)
    assert 0 < total.accepted and (draft == "self-int4" or total.accepted < total.drafted)  # kept and rejected


# -- the rejection rule, by hand -------------------------------------------------------------------------


def test_rejection_rule_by_hand():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.6, 0.1, 0.1])
    assert acceptance(p, q, 0) == 1.0  # p >= q: always kept
    assert acceptance(p, q, 1) == pytest.approx(0.5)  # 0.3 / 0.6
    assert acceptance(p, q, 2) == 1.0
    assert acceptance(p, q, 3) == 0.0  # the target never says token 3
    # max(0, p - q) = [0.3, 0, 0.1, 0], normalised
    assert residual(p, q, 1).tolist() == pytest.approx([0.75, 0.0, 0.25, 0.0])
    # A certain draft (prompt lookup, q one-hot at x): kept with probability p(x); the rest is p without x.
    assert acceptance(p, None, 1) == pytest.approx(0.3)
    assert residual(p, None, 1).tolist() == pytest.approx([0.5 / 0.7, 0.0, 0.2 / 0.7, 0.0])
    # Greedy: p one-hot. The draft's token is kept exactly when it is the argmax, else replaced by it.
    g = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert verify_draft(g, None, 1, torch.Generator()) == 1
    assert verify_draft(g, torch.tensor([0.0, 0.0, 1.0, 0.0]), 2, torch.Generator()) == 1


def test_rejection_rule_outputs_p():
    """x ~ q, then the rule: by hand, P(out = 0) = q0 + q1 (1 - 0.5) * 0.75 = 0.2 + 0.3 * 0.75 = 0.425 ... in
    general p itself: [0.5, 0.3, 0.2, 0]. 20,000 draws, each outcome within 4 standard errors."""
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.6, 0.1, 0.1])
    g = torch.Generator().manual_seed(0)
    n = 20_000
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    out = torch.bincount(torch.tensor([verify_draft(p, q, x, g) for x in drafts]), minlength=4).double() / n
    assert out[3] == 0
    assert ((out - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-12).all(), out


# -- the API, the CLI, bad input ---------------------------------------------------------------------------


def swapped_vocabulary(directory):
    """The same checkpoint with two tokens' ids exchanged in tokenizer.json."""
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory, vocab[b]


def test_load_with_drafts_and_bad_drafts(tiny, target_dir, other_dir, tmp_path):
    source = target_dir
    text = tiny.generate(PROMPTS[3], temperature=0, max_new_tokens=16)
    for options in (dict(draft="self-int4", draft_tokens=3), dict(lookup=2), dict(draft=str(other_dir))):
        llm = LLM.load(source, quantize="none", **options)
        assert llm.generate(PROMPTS[3], temperature=0, max_new_tokens=16) == text, options
        assert llm.last_stats.passes > 0
    bad, token = swapped_vocabulary(tiny_base(tmp_path / "bad", seed=5, intermediate_size=96))
    with pytest.raises(LlamitaError, match=f"token {token} is .* a draft needs the same tokenizer") as e:
        LLM.load(source, quantize="none", draft=bad)
    assert "\n" not in str(e.value)
    with pytest.raises(LlamitaError, match="give one"):
        LLM.load(source, draft="self-int4", lookup=2)
    with pytest.raises(LlamitaError, match="needs a float model"):
        LLM.load(source, quantize="int4", draft="self-int4")


def test_cli_flags(tiny, target_dir, capsys):
    from llamita import cli

    source = str(target_dir)
    want = tiny.generate(PROMPTS[0], temperature=0, max_new_tokens=16) + "\n"
    assert cli.main(["generate", PROMPTS[0], "--model", source, "--quantize", "none", "--temperature", "0",
                     "--max-new-tokens", "16", "--lookup", "2", "--draft-tokens", "5", "--verbose"]) == 0
    out = capsys.readouterr()
    assert out.out == want
    assert out.err.startswith("llamita: speculation: ") and "tokens per target pass" in out.err
    assert cli.main(["generate", "x", "--model", source, "--draft", "self-int4", "--lookup", "2"]) == 2
    assert capsys.readouterr().err == "llamita: error: --draft and --lookup are two kinds of draft: give one\n"


@pytest.mark.slow
def test_server_speculates_for_a_request_alone(default_llm):
    """With a drafter, the server's engine checks drafted tokens for a request running alone (the
    same greedy text as plain decoding, fewer passes than tokens, counted in /metrics); requests
    batched together decode plainly, with their usual text."""
    import asyncio

    import httpx

    from llamita.serve.app import create_app

    llm = LLM(default_llm.model, default_llm.tokenizer, drafter=LookupDrafter(3), draft_tokens=4)
    alone = "red, green, blue, yellow, " * 6  # the model keeps the pattern going, which lookup foresees
    batch = ["Once upon a time", "The capital of France is"]
    app = create_app(llm, max_batch=4, max_seq_len=512)

    async def work():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
                async def complete(prompt: str) -> str:
                    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
                    return (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]

                one = await complete(alone)
                after_one = (await client.get("/metrics")).text
                many = await asyncio.gather(*(complete(p) for p in batch))
                return one, after_one, many

    one, after_one, many = asyncio.run(work())
    assert one == default_llm.generate(alone, max_new_tokens=24, temperature=0)
    m = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in after_one.splitlines()
         if line and not line.startswith("#")}
    assert m["llamita_speculative_accepted_tokens_total"] > 0
    assert 0 < m["llamita_speculative_passes_total"] < m["llamita_generated_tokens_total"] - 1
    assert m["llamita_speculative_tokens_per_pass"] > 1
    assert many == [default_llm.generate(p, max_new_tokens=24, temperature=0) for p in batch]
