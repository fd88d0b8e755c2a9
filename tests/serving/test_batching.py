"""Continuous batching in the serving loop changes no answer: requests generated concurrently through one
LocalModel (their decode steps batched, long prompts prefilled in chunks between the others' steps) give the
same tokens as each request generated alone on the unbatched path, greedy and seeded sampling, exact and fast."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh402.engine import Engine
from mesh402.engine.sampling import SamplingParams
from mesh402.serving.generation import Finished, GenerationRequest, LocalModel, generate
from tests.support.engine import smollm2_gguf

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,",
           "Once upon a time, in a land far away, there lived a " * 6, "def fib(n):", "Hello"]


async def _run(lm: LocalModel, ids: list[int], params: SamplingParams, n: int) -> list[int]:
    st = await lm.open(len(ids) + n + 1, params)
    out: list[int] = []
    async for ev in generate(GenerationRequest(ids, n, params), st, lm.tokenizer, lm.eos_ids):
        if not isinstance(ev, Finished) and ev.token_id is not None:
            out.append(ev.token_id)
    return out


@pytest.mark.parametrize("mode,max_batch", [("exact", 8), ("fast", 8), ("fast", 2)])
def test_concurrent_requests_equal_alone(mode, max_batch):
    """max_batch=2 with 6 requests: the step is full, the rest wait their turn (oldest first) and all finish."""
    n = 6 if mode == "exact" else 12
    eng = Engine.load(smollm2_gguf(), mode=mode)
    tok = eng.tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    params = [SamplingParams(temperature=0, seed=0) if i % 2 else SamplingParams(temperature=0.9, seed=i)
              for i in range(len(PROMPTS))]
    ex = ThreadPoolExecutor(max_workers=1)

    async def main():
        alone_lm = LocalModel(eng, ex, prefix_cache=None, max_batch=1)
        assert alone_lm.scheduler is None
        alone = [await _run(alone_lm, i, p, n) for i, p in zip(ids, params)]
        lm = LocalModel(eng, ex, prefix_cache=None, max_batch=max_batch, step_tokens=32)
        together = await asyncio.gather(*(_run(lm, i, p, n) for i, p in zip(ids, params)))
        return alone, together, lm.scheduler

    alone, together, sched = asyncio.run(main())
    assert together == alone
    assert 1 < sched.widest <= max_batch, "no step batched more than one request, or too many"
    assert sched.rows > sched.steps


def test_prefix_reuse_under_batching():
    """A warm prefix cache under batching gives what a cold, unbatched run gives, token for token."""
    eng = Engine.load(smollm2_gguf(), mode="fast")
    base = eng.tokenizer.encode("You are a helpful assistant. " * 8)
    ids = [base + eng.tokenizer.encode(q) for q in ("What is 2+2?", "Name a color.", "Say hi.")]
    params = SamplingParams(temperature=0, seed=0)
    ex = ThreadPoolExecutor(max_workers=1)

    async def main():
        cold = LocalModel(eng, ex, prefix_cache=None, max_batch=1)
        alone = [await _run(cold, i, params, 8) for i in ids]
        warm = LocalModel(eng, ex, max_batch=8)
        await _run(warm, ids[0], params, 8)  # fills the cache with the shared prefix
        together = await asyncio.gather(*(_run(warm, i, params, 8) for i in ids))
        return alone, together

    alone, together = asyncio.run(main())
    assert together == alone


@pytest.mark.parametrize("mode,together", [("fast", 3), ("exact", 1)])
def test_a_step_budget_pays_for_the_rows_the_engine_computes(mode, together):
    """Fast mode computes only a chunk's real rows, so a step's prompt budget (32 here) takes three 5-token
    prompts at once; exact mode computes each chunk's 32 rows, so one prompt fills the budget."""
    from mesh402.serving.scheduler import _Prefill

    eng = Engine.load(smollm2_gguf(), mode=mode, load_tokenizer=False)
    assert eng.prefill_rows(5) == (5 if mode == "fast" else 32)
    ex = ThreadPoolExecutor(max_workers=1)
    params = SamplingParams(temperature=0, seed=0)

    async def main() -> list[bool]:
        lm = LocalModel(eng, ex, prefix_cache=None, max_batch=8, step_tokens=32)
        loop = asyncio.get_running_loop()
        jobs = [_Prefill(await lm.open(16, params), [1, 2, 3, 4, 5 + i], loop.create_future()) for i in range(3)]
        lm.scheduler._step(jobs, [])  # one step, as the engine thread runs it
        await asyncio.sleep(0.05)  # the results are handed to this loop thread-safely
        done = [j.future.done() for j in jobs]
        for j in jobs:
            j.stepper.session.close()
        return done

    try:
        done = asyncio.run(main())
    finally:
        ex.shutdown()
    assert done == [True] * together + [False] * (3 - together)
