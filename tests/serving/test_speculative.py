"""Speculative decoding is lossless: with prompt-lookup drafts verified in one batched step, every request's
tokens equal plain decoding's, greedy and seeded sampling, exact and fast, alone and beside other requests
(drafts of several sessions in one step) — and drafts are really accepted (the test is not vacuous)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh402.engine import Engine
from mesh402.engine.sampling import SamplingParams
from mesh402.serving.generation import Finished, GenerationRequest, LocalModel, generate
from mesh402.serving.speculative import ngram_draft
from tests.support.engine import smollm2_gguf

PROMPTS = ["Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
           "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
           "Hello"]


def test_ngram_draft():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert ngram_draft([5, 6, 7, 5, 6, 8, 5, 6], 2) == [8, 5]  # the latest earlier occurrence
    assert ngram_draft([1, 2, 3], 4) == []
    assert ngram_draft([4, 4], 3) == [4]
    assert ngram_draft([1], 3) == [] and ngram_draft([1, 1, 1], 0) == []


async def _run(lm: LocalModel, ids: list[int], params: SamplingParams, n: int) -> tuple[list[int], int]:
    st = await lm.open(len(ids) + n + 1, params)
    out: list[int] = []
    async for ev in generate(GenerationRequest(ids, n, params), st, lm.tokenizer, lm.eos_ids):
        if not isinstance(ev, Finished) and ev.token_id is not None:
            out.append(ev.token_id)
    return out, st.accepted


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("max_batch", [1, 8])
def test_speculative_equals_plain(mode, max_batch):
    n = 10 if mode == "exact" else 24
    eng = Engine.load(smollm2_gguf(), mode=mode)
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    params = [SamplingParams(temperature=0, seed=0) if i % 2 == 0 else SamplingParams(temperature=0.7, seed=i)
              for i in range(len(PROMPTS))]
    ex = ThreadPoolExecutor(max_workers=1)

    async def main():
        plain = LocalModel(eng, ex, prefix_cache=None, max_batch=1)
        ref = [(await _run(plain, i, p, n))[0] for i, p in zip(ids, params)]
        spec = LocalModel(eng, ex, prefix_cache=None, max_batch=max_batch, speculative_k=4)
        got = await asyncio.gather(*(_run(spec, i, p, n) for i, p in zip(ids, params)))
        return ref, got

    ref, got = asyncio.run(main())
    assert [g[0] for g in got] == ref
    assert sum(g[1] for g in got) > 0, "no draft was ever accepted"
