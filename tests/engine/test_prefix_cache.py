"""KV prefix reuse in the engine: warm and cold runs give identical tokens, cached_tokens counts
the reused prefix, the cache is bounded and evicts."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh402.engine.sampling import SamplingParams
from mesh402.serving.generation import Delta, Finished, GenerationRequest, LocalModel, generate

SYSTEM = "You are a careful assistant. " * 12


@pytest.fixture(scope="module")
def engine():
    from mesh402.engine import Engine
    from mesh402.models.catalog import bundled_model_path

    return Engine.load(bundled_model_path(), mode="fast", prefill_chunk=32)


def prompt(engine, user: str) -> list[int]:
    text = engine.chat_template.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    return engine.tokenizer.encode(text, add_special=False)


def run(lm: LocalModel, ids: list[int], n: int = 12) -> tuple[list[int], Finished]:
    async def go():
        params = SamplingParams(temperature=0, seed=0)
        st = await lm.open(len(ids) + n, params)
        toks, fin = [], None
        async for ev in generate(GenerationRequest(ids, n, params), st, lm.tokenizer, lm.eos_ids):
            if isinstance(ev, Delta):
                toks.append((ev.token_id, ev.text))
            elif isinstance(ev, Finished):
                fin = ev
        await asyncio.sleep(0.05)  # session close runs on the executor
        return toks, fin

    return asyncio.run(go())


def test_warm_equals_cold_and_reports_cached_tokens(engine) -> None:
    ex = ThreadPoolExecutor(1)
    cold_lm = LocalModel(engine, ex, prefix_cache=None)
    warm_lm = LocalModel(engine, ex)
    a = prompt(engine, "Name three colours.")
    b = prompt(engine, "Name three animals that live in the sea.")
    cold_a, fa = run(cold_lm, a)
    cold_b, fb = run(cold_lm, b)
    assert fa.cached_tokens == 0 and fb.cached_tokens == 0
    first, f1 = run(warm_lm, a)  # fills the cache
    assert f1.cached_tokens == 0 and first == cold_a
    again, f2 = run(warm_lm, a)  # same prompt: all whole chunks but the last token's
    assert again == cold_a and f2.cached_tokens > 0 and f2.cached_tokens % 32 == 0
    other, f3 = run(warm_lm, b)  # shares the system prompt
    assert other == cold_b and 0 < f3.cached_tokens <= len(b) - 1
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert f3.cached_tokens == common // 32 * 32
    st = warm_lm.prefix_cache.stats()
    assert st["hits"] == 2 and st["entries"] >= 1


def test_cache_is_bounded(engine) -> None:
    from mesh402.engine.prefix import PrefixCache

    ex = ThreadPoolExecutor(1)
    lm = LocalModel(engine, ex, prefix_cache=PrefixCache(32, max_entries=2))
    for i in range(4):
        run(lm, engine.tokenizer.encode(f"{i} " * 80, add_special=False), n=1)
    st = lm.prefix_cache.stats()
    assert st["entries"] == 2 and st["evictions"] == 2
