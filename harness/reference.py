"""Reference answers for multi-node tests: one in-process engine, exact mode, greedy; and the ready plan a
node shows (any object with a `status()` of the management API)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def greedy_text(path: str | Path, messages: list[dict], max_tokens: int) -> str:
    """What a single node holding the whole model answers (exact mode, temperature 0)."""
    from mesh402.engine import Engine
    from mesh402.engine.sampling import SamplingParams
    from mesh402.serving.generation import Delta, GenerationRequest, LocalModel, generate

    eng = Engine.load(path, mode="exact")
    ids = eng.tokenizer.encode(eng.chat_template.render(messages), add_special=False)

    async def run() -> str:
        lm = LocalModel(eng, ThreadPoolExecutor(1))
        params = SamplingParams(temperature=0, seed=0)
        st = await lm.open(len(ids) + max_tokens, params)
        out = []
        async for ev in generate(GenerationRequest(ids, max_tokens, params), st, lm.tokenizer, lm.eos_ids):
            if isinstance(ev, Delta):
                out.append(ev.text)
        return "".join(out)

    return asyncio.run(run())


def ready_plan(node) -> dict | None:
    """The first ready model plan a node's /api/status shows (host, stages, experts ...)."""
    plans = node.status()["node"]["distributed"]["plans"]
    ready = [p for p in plans.values() if p.get("ready")]
    return ready[0] if ready else None
