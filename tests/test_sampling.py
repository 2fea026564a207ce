"""Sampling rules, checked on distributions whose answers are known by hand."""

from __future__ import annotations

import math

import torch

from llamita.sampling import SamplingParams, penalize_repetition, sample


def logits_for(probs: list[float], vocab: int = 1000) -> torch.Tensor:
    """Logits whose softmax puts ``probs`` on the first tokens and the rest evenly elsewhere."""
    rest = (1 - sum(probs)) / (vocab - len(probs))
    return torch.tensor([math.log(p) for p in probs] + [math.log(rest)] * (vocab - len(probs)))


def draws(logits: torch.Tensor, n: int = 300, **kw) -> set[int]:
    params, g = SamplingParams(**kw), torch.Generator().manual_seed(0)
    return {sample(logits, params, g) for _ in range(n)}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = logits_for([0.5, 0.3, 0.15])
    assert draws(logits, temperature=1.0, top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draws(logits, temperature=1.0, top_p=0.81) == {0, 1, 2}


def test_top_p_beyond_the_shortlist_uses_the_whole_vocabulary():
    nearly_uniform = -torch.arange(1000) * 1e-4  # strictly decreasing: the nucleus is a prefix of ids
    probs = torch.softmax(nearly_uniform, -1)
    nucleus = int((probs.cumsum(-1) - probs < 0.9).sum())  # ~900 tokens, far past a 256 shortlist
    seen = draws(nearly_uniform, n=3000, temperature=1.0, top_p=0.9)
    assert len(seen) > 256 and max(seen) > 256
    assert max(seen) < nucleus


def test_top_k_and_greedy():
    logits = logits_for([0.4, 0.3, 0.2])
    assert draws(logits, temperature=1.0, top_p=1.0, top_k=2) == {0, 1}
    assert draws(logits, n=5, temperature=0) == {0}


def test_repetition_penalty_as_ctrl_defines_it():
    logits = torch.tensor([2.0, -2.0, 1.0])
    seen = torch.tensor([True, True, False])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [1.0, -4.0, 1.0]
