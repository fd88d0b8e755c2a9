"""KV prefix reuse on a pipeline split (in-process stages over memory links): a warm request
restores the host's and every stage's rows, prefills only the rest and gives the same tokens as
a cold run; a stage that lost its rows falls back to a cold run; failover after a warm start
still replays an exact session."""

from __future__ import annotations

import asyncio

from mesh402.engine import Engine
from mesh402.engine.sampling import SamplingParams
from mesh402.serving.generation import Delta, Finished, GenerationRequest, LocalModel, generate
from tests.support.pipeline import build

SYSTEM = "You are a careful assistant. Answer briefly and exactly. " * 8


def prompt_for(eng: Engine, q: str) -> list[int]:
    text = eng.chat_template.render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
    return eng.tokenizer.encode(text, add_special=False)


async def gen(model, ids: list[int], n: int = 10, kill=None) -> tuple[list[int], int]:
    params = SamplingParams(temperature=0, seed=1)
    st = await model.open(len(ids) + n, params)
    out, cached = [], -1
    async for ev in generate(GenerationRequest(ids, n, params), st, model.tokenizer, []):
        if isinstance(ev, Delta) and ev.token_id is not None:
            out.append(ev.token_id)
            if kill is not None and len(out) == 3:
                kill()
        elif isinstance(ev, Finished):
            cached = ev.cached_tokens
    await asyncio.sleep(0.2)  # release: rows kept, stages told
    return out, cached


def test_split_prefix_reuse_equals_cold(executor, solo) -> None:
    a, b = prompt_for(solo, "Name a colour."), prompt_for(solo, "Name an animal that swims.")

    async def main():
        ref_a, _ = await gen(LocalModel(solo, executor, prefix_cache=None), a)
        ref_b, _ = await gen(LocalModel(solo, executor, prefix_cache=None), b)
        model, mesh, _ = await build(executor, [0, 10, 20, 30], standbys=["standby"])
        first, c1 = await gen(model, a)
        warm, c2 = await gen(model, b)  # same system prompt
        # a stage that lost its rows: cold again, same tokens
        for w in mesh.workers.values():
            w.prefix_rows = None
        cold_again, c3 = await gen(model, b)
        # failover after a warm start replays the cached frames too
        after_kill, c4 = await gen(model, b, kill=lambda: mesh.kill("w1"))
        return ref_a, ref_b, first, c1, warm, c2, cold_again, c3, after_kill, c4, model

    ref_a, ref_b, first, c1, warm, c2, cold_again, c3, after_kill, c4, model = asyncio.run(main())
    assert first == ref_a and c1 == 0
    assert warm == ref_b and c2 > 0 and c2 % 32 == 0
    assert cold_again == ref_b and c3 == 0
    assert after_kill == ref_b and c4 > 0 and model.stats.failovers == 1


def test_paid_warm_request_reveals_from_position_zero(executor, solo) -> None:
    """A paid (audited) request that restores a prompt prefix still reveals the steps that built it, so the
    validator replays from position 0 and an honest stage passes."""
    from mesh402.work.evidence import Auditor, spot_checks
    from mesh402.serving.spot_checks import PASS_SCORE, judge
    a, b = prompt_for(solo, "Name a colour."), prompt_for(solo, "Name an animal that swims.")
    got: list = []

    async def main():
        model, mesh, _ = await build(executor, [0, 10, 20, 30])
        model.receipt_sink = lambda rs, ev=None: got.append((rs, ev))  # signed by the host that assigned the ranges
        model.auditor = Auditor(1.0, 3600)
        await gen(model, a)
        _, cached = await gen(model, b)  # same system prompt: warm
        return cached

    cached = asyncio.run(main())
    assert cached > 0 and len(got) == 2
    receipts, evidence = got[1]
    checks = spot_checks(receipts, evidence)
    assert all(not c.fault for c in checks) and all(c.inputs[0]["pos"] == 0 for c in checks)
    v = judge(checks, lambda h, s, e, mode: Engine.load(solo.source.path, mode=mode, layers=(s, e), load_tokenizer=False))
    assert v.score == PASS_SCORE and v.checked == 2, v.to_json()
