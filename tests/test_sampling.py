"""Sampling rules, checked on distributions whose answers are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llamita.errors import LlamitaError
from llamita.sampling import GREEDY_BELOW, PENALTY_RANGE, SamplingParams, penalize_repetition, sample


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


def test_temperatures_below_the_cut_off_sample_greedily():
    """Dividing by 1e-45 made the logits inf and the probabilities NaN."""
    logits = logits_for([0.4, 0.3, 0.2])
    for t in (1e-45, 1e-40, GREEDY_BELOW / 2):
        assert draws(logits, n=5, temperature=t) == {0}
    assert draws(logits, n=5, temperature=GREEDY_BELOW, top_p=1.0) == {0}  # sampled, from finite probabilities


def test_repetition_penalty_is_bounded():
    for bad in (1e-300, 0.0, 1e300, PENALTY_RANGE[0] / 2, PENALTY_RANGE[1] * 2, math.nan):
        with pytest.raises(LlamitaError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad)
    logits, seen = torch.tensor([30.0, -30.0, 1.0]), torch.tensor([True, True, False])
    for penalty in PENALTY_RANGE:  # at either end, the smallest temperature still samples from finite numbers
        params = SamplingParams(repetition_penalty=penalty, temperature=GREEDY_BELOW, top_p=1.0)
        assert sample(logits, params, torch.Generator().manual_seed(0), seen) in (0, 2)
        scaled = penalize_repetition(logits, seen, penalty) / GREEDY_BELOW
        assert torch.isfinite(scaled).all() and torch.isfinite(torch.softmax(scaled, -1)).all()
