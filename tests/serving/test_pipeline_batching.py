"""Busy splits: several sessions in flight through an in-process pipeline split, the host's stage and every
worker stage running the sessions' decode rows as one batched forward (serving/stage_batch.py). Batching
changes no answer: each session's tokens equal the same session run alone on the same split (and, exact
mode, the whole model's), and every stage's signed receipt of each session (its token count and the running
hashes of every activation it received and sent, the last stage's logits fingerprints included) equals the
one it signs running that session alone, so each receipt claims exactly its own session's rows."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh402.engine import Engine
from mesh402.engine.sampling import SamplingParams
from mesh402.serving.generation import GenerationRequest, LocalModel, generate
from mesh402.serving.pipeline import PipelineModel
from tests.support.pipeline import build

N = 8
PROMPTS = [list(range(20, 45)), [7, 8, 9], list(range(300, 340)), [42] * 12, list(range(1000, 1017))]
SAMPLINGS = [SamplingParams(temperature=0, seed=1), SamplingParams(temperature=0.8, seed=5),
             SamplingParams(temperature=0, seed=1), SamplingParams(temperature=0.9, top_p=0.9, seed=11),
             SamplingParams(temperature=0.7, seed=3)]


async def _gen(model: Any, i: int) -> list[int]:
    """Session i: N tokens (no EOS), under a fixed request id so its receipts can be compared across runs."""
    req = GenerationRequest(PROMPTS[i], N, SAMPLINGS[i])
    rid = {"request_id": f"session-{i}"} if isinstance(model, PipelineModel) else {}
    stepper = await model.open(len(PROMPTS[i]) + N, SAMPLINGS[i], **rid)
    out = [ev.token_id async for ev in generate(req, stepper, model.tokenizer, [])
           if getattr(ev, "token_id", None) is not None]
    return out


async def _run(executor: Any, splits: list[int], mode: str, together: bool
               ) -> tuple[list[list[int]], dict[str, list[tuple]], PipelineModel, Any]:
    """Every session on a fresh split: all at once (batching on), or one after the other with batching off.
    Returns the tokens, each request's receipts (stage, layers, tokens, input and output hashes), the model
    and the mesh."""
    model, mesh, _ = await build(executor, splits, mode=mode, max_batch=8 if together else 1)
    model.prefix = None  # no KV prefix reuse between the sessions: each run computes every step
    receipts: dict[str, list[tuple]] = {}

    def sink(rs: list[Any], evidence: Any = None) -> None:
        receipts[rs[0].request_id] = [(r.stage, r.layer_start, r.layer_end, r.tokens, r.input_hash, r.output_hash)
                                      for r in rs]
    model.receipt_sink = sink
    if together:
        tokens = list(await asyncio.gather(*(_gen(model, i) for i in range(len(PROMPTS)))))
    else:
        tokens = [await _gen(model, i) for i in range(len(PROMPTS))]
    for _ in range(200):
        if len(receipts) == len(PROMPTS):
            break
        await asyncio.sleep(0.02)
    return tokens, receipts, model, mesh


@pytest.mark.parametrize("mode,splits", [("exact", [0, 10, 20, 30]), ("fast", [0, 15, 30])],
                         ids=["exact-3-stage", "fast-2-stage"])
def test_concurrent_sessions_on_a_split_equal_each_alone(executor, solo: Engine, mode, splits) -> None:
    async def main() -> None:
        alone, alone_receipts, _, _ = await _run(executor, splits, mode, together=False)
        got, got_receipts, model, mesh = await _run(executor, splits, mode, together=True)
        assert got == alone, "a session's tokens changed when it ran beside the others"
        assert len(alone_receipts) == len(PROMPTS) and all(len(r) == len(splits) - 1 for r in alone_receipts.values())
        assert got_receipts == alone_receipts, "a stage's receipt of a session changed under batching"
        # the host's stage and every worker stage really ran several sessions' rows in one forward
        assert model.rows is not None and max(model.rows.widths) > 1, model.rows.widths
        for name, w in mesh.workers.items():
            widths = [n for b in w.batchers.values() for n in b.widths]
            assert widths and max(widths) > 1, f"{name} never batched: {widths}"
        if mode == "exact":  # split == solo: the greedy sessions equal the whole model's answer
            whole = LocalModel(solo, executor, max_batch=1)
            for i, s in enumerate(SAMPLINGS):
                if s.temperature == 0:
                    assert got[i] == await _gen(whole, i)

    asyncio.run(main())
