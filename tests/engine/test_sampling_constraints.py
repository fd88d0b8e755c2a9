"""Sampler extensions: token mask, logit_bias, logprobs, per-choice seeds (and nothing changed without them)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mesh402.engine.sampling import Sampler, SamplingParams, choice_seeds, token_logprobs

torch.set_num_threads(1)


def logits(seed: int = 0, vocab: int = 5000, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draws(params: SamplingParams, x: torch.Tensor, allowed=None, n: int = 64) -> list[int]:
    s = Sampler(params)
    return [s.sample(x, [], p, allowed=allowed) for p in range(n)]


PARAMS = [SamplingParams(seed=3), SamplingParams(seed=3, temperature=0.7, top_p=0.9),
          SamplingParams(seed=3, top_k=40, min_p=0.05), SamplingParams(temperature=0),
          SamplingParams(seed=3, repetition_penalty=1.3, frequency_penalty=0.5)]


@pytest.mark.parametrize("params", PARAMS)
def test_all_true_mask_and_empty_bias_change_nothing(params: SamplingParams) -> None:
    x = logits()
    plain = draws(params, x)
    assert draws(params, x, allowed=torch.ones(x.numel(), dtype=torch.bool)) == plain
    assert draws(dataclasses.replace(params, logit_bias={}), x) == plain


@pytest.mark.parametrize("params", PARAMS)
def test_mask_restricts_and_renormalises(params: SamplingParams) -> None:
    x = logits(1)
    allowed = torch.zeros(x.numel(), dtype=torch.bool)
    allowed[torch.arange(7, 5000, 97)] = True
    got = draws(params, x, allowed, 200)
    assert all(allowed[t] for t in got)
    # the masked draw equals the draw over the row with -inf outside the mask
    masked = x.clone().masked_fill_(~allowed, float("-inf"))
    assert got == draws(params, masked, None, 200)


def test_mask_single_token_and_empty_mask() -> None:
    x = logits(2)
    only = torch.zeros(x.numel(), dtype=torch.bool)
    only[4321] = True
    assert set(draws(SamplingParams(seed=0), x, only, 10)) == {4321}
    assert set(draws(SamplingParams(temperature=0), x, only, 3)) == {4321}
    with pytest.raises(ValueError, match="allows no token"):
        Sampler(SamplingParams(seed=0)).sample(x, [], 0, allowed=torch.zeros(x.numel(), dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        Sampler(SamplingParams(seed=0)).sample(x, [], 0, allowed=torch.ones(10, dtype=torch.bool))


def test_logit_bias_openai_semantics() -> None:
    x = torch.tensor([5.0, 1.0, 0.0, -1.0])
    greedy = Sampler(SamplingParams(temperature=0, logit_bias={"3": 10}))
    assert greedy.sample(x, [], 0) == 3  # +10 on -1.0 beats 5.0
    ban = SamplingParams(seed=0, logit_bias={0: -100})
    assert 0 not in draws(ban, x, n=300)
    force = SamplingParams(seed=0, logit_bias={2: 100})
    assert set(draws(force, x, n=100)) == {2}
    ids, probs = Sampler(SamplingParams(logit_bias={1: 1.0})).candidates(torch.zeros(3))
    e = torch.exp(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert probs.tolist() == pytest.approx((e / e.sum()).tolist())
    with pytest.raises(ValueError, match="outside"):
        Sampler(SamplingParams(logit_bias={9: 1})).sample(x, [], 0)


def test_logit_bias_normalised_and_serialisable() -> None:
    p = SamplingParams(seed=1, logit_bias={"7": 2, 3: -1.5})
    assert p.logit_bias == ((3, -1.5), (7, 2.0))
    again = SamplingParams(**json.loads(json.dumps(dataclasses.asdict(p))))  # the wire format stages use
    assert again == p and hash(again) == hash(p)
    for bad in ({"x": 1}, {-1: 1}, {1: 101}, {1: "a"}, {1.5: 1}, "nope", {True: 1}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_logprobs_are_the_raw_distribution() -> None:
    x = logits(3, vocab=1000)
    ref = torch.log_softmax(x.double(), 0)
    lp = token_logprobs(x, 17, top_n=5)
    assert lp.token == 17 and lp.logprob == pytest.approx(float(ref[17]), abs=1e-12)
    top = torch.topk(ref, 5)
    assert [i for i, _ in lp.top] == top.indices.tolist()
    assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-12)
    assert token_logprobs(x, 17).top == ()
    tied = token_logprobs(torch.tensor([1.0, 3.0, 3.0, 0.0]), 0, top_n=2)
    assert [i for i, _ in tied.top] == [1, 2]  # ties by lower id
    with pytest.raises(ValueError):
        token_logprobs(x, 17, top_n=21)
    with pytest.raises(ValueError):
        token_logprobs(x, 1000)


def test_logprobs_thread_count_independent() -> None:
    x = logits(4, vocab=200_000, scale=1.0)
    try:
        torch.set_num_threads(2)
        two = token_logprobs(x, 5, top_n=20)
    finally:
        torch.set_num_threads(1)
    assert token_logprobs(x, 5, top_n=20) == two


def test_choice_seeds() -> None:
    seeds = choice_seeds(42, 4)
    assert seeds[0] == 42 and len(set(seeds)) == 4 and seeds == choice_seeds(42, 4)
    assert all(0 <= s < 2**63 for s in seeds)
    assert choice_seeds(43, 4)[1:] != seeds[1:]
    x = logits(5)
    outs = [draws(SamplingParams(seed=s, temperature=1.0), x, n=32) for s in seeds]
    assert len({tuple(o) for o in outs}) == 4
    assert outs[0] == draws(SamplingParams(seed=42, temperature=1.0), x, n=32)  # n=1 answer == choice 0
    with pytest.raises(ValueError):
        choice_seeds(1, 0)
