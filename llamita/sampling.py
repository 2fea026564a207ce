"""Choosing the next token: temperature, top-k, top-p and repetition penalty, per request."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llamita.errors import LlamitaError
from llamita.options import option

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily: dividing by them overflows float32 (vLLM's cut-off)
PENALTY_RANGE = (0.01, 100.0)  # repetition penalties outside it overflow the logits or zero them; 1 = off
MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 1000  # characters per stop string


@dataclass
class SamplingParams:
    """How one request samples. Defaults are Meta's chat defaults (temperature 0.6, top-p 0.9)."""

    max_new_tokens: int = option(256, "tokens to generate at most")
    temperature: float = option(0.6, f"0 = greedy (so is anything below {GREEDY_BELOW})")
    top_p: float = option(0.9, "nucleus sampling: the smallest set of tokens with this much probability")
    top_k: int | None = option(None, "sample among the k most likely tokens")
    repetition_penalty: float = option(1.0, "divide the logits of tokens already present (CTRL's rule; 1 = off; "
                                              f"{PENALTY_RANGE[0]} to {PENALTY_RANGE[1]})")
    stop: list[str] = option([], f"stop string (repeatable, up to {MAX_STOPS}, of {MAX_STOP_CHARS} characters each)")
    seed: int | None = option(None, "random seed (the same seed, the same text)")

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be a number >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k is None or self.top_k >= 1, "top_k must be at least 1"),
            (PENALTY_RANGE[0] <= self.repetition_penalty <= PENALTY_RANGE[1],
             f"repetition_penalty must be in [{PENALTY_RANGE[0]}, {PENALTY_RANGE[1]}]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (len(self.stop) <= MAX_STOPS, f"stop: at most {MAX_STOPS} strings, not {len(self.stop)}"),
            (all(len(s) <= MAX_STOP_CHARS for s in self.stop if isinstance(s, str)),
             f"stop: at most {MAX_STOP_CHARS} characters each"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlamitaError(message)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator of this request's own: the same seed gives the same tokens, batched or not."""
        g = torch.Generator(device=device)
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def penalize_repetition(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty, as transformers applies it: shrink the logits of tokens already present."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def distribution(logits: Tensor, params: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """The probabilities [vocab] (float32, summing to 1) that ``sample`` draws from: after the
    repetition penalty, temperature, top-k and top-p; greedy: one-hot at the argmax. Speculative
    decoding compares the target's and the draft's (``verify_draft``), so there is one definition."""
    logits = _penalized(logits, params, seen)
    if params.temperature < GREEDY_BELOW:
        return torch.zeros_like(logits).index_fill_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # The nucleus is a prefix of the tokens sorted by probability; it almost always lies
        # within the top 256, so sort those and fall back to the full vocabulary only if not.
        sorted_probs, order = probs.topk(min(256, probs.shape[-1]))
        if sorted_probs.sum() < params.top_p:
            sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        kept = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, kept / kept.sum())
    return probs


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator, seen: Tensor | None = None) -> int:
    """One token id from one row of logits [vocab]; greedy takes the argmax without building the
    one-hot distribution (every token of every greedy request passes here)."""
    if params.temperature < GREEDY_BELOW:
        return int(_penalized(logits, params, seen).argmax())
    return int(torch.multinomial(distribution(logits, params, seen), 1, generator=generator))


def _penalized(logits: Tensor, params: SamplingParams, seen: Tensor | None) -> Tensor:
    """float32 logits with the repetition penalty applied (the first step of ``distribution``)."""
    logits = logits.float()
    return logits if seen is None else penalize_repetition(logits, seen, params.repetition_penalty)


# -- speculative sampling (Leviathan et al. 2023, Chen et al. 2023) ---------------------------------------
# A draft proposes token x from its distribution q; the target, whose distribution is p, keeps it with
# probability min(1, p(x) / q(x)) and otherwise draws from the residual norm(max(0, p - q)). The token
# that results is distributed as p exactly, whatever q is. q None: a draft that proposes x for certain
# (prompt lookup), q = one-hot(x).


def acceptance(p: Tensor, q: Tensor | None, token: int) -> float:
    """The probability of keeping a draft's ``token``: min(1, p(x) / q(x))."""
    qx = 1.0 if q is None else float(q[token])
    return min(1.0, float(p[token]) / qx) if qx > 0 else 1.0


def residual(p: Tensor, q: Tensor | None, token: int) -> Tensor:
    """What a rejected draft token is replaced from: norm(max(0, p - q)). Where that is all zero (p
    equals q, up to rounding, so nothing is ever rejected in exact arithmetic) it is p."""
    if q is None:
        rest = p.clone().index_fill_(-1, torch.tensor([token], device=p.device), 0.0)
    else:
        rest = (p - q).clamp_(min=0)
    total = rest.sum()
    return rest / total if total > 0 else p


def verify_draft(p: Tensor, q: Tensor | None, token: int, generator: torch.Generator) -> int:
    """The draft's ``token`` if the rejection rule keeps it, else its replacement; distributed as ``p``.
    Greedy (p one-hot) draws nothing random: the token is kept exactly when it is the argmax."""
    keep = acceptance(p, q, token)
    if keep >= 1.0 or (keep > 0 and float(torch.rand((), generator=generator)) < keep):
        return token
    return int(torch.multinomial(residual(p, q, token), 1, generator=generator))
