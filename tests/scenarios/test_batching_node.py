"""Continuous batching in a real `mesh402 serve` process changes no answer: each request's text, alone, equals
its text beside 7 other concurrent requests with other prompts and lengths (their decode steps batched), in
fast and exact mode, greedy and seeded sampling."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from harness.procs import MESH402, NodeProcess, free_port

KEY = "batch-key-1"
MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,", "def fib(n):",
           "Once upon a time, in a land far away, there lived a " * 5, "Hello", "The best way to learn is",
           "Q: What is 7 times 8?\nA:"]


async def _complete(base: str, i: int, prompt: str, n: int) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "seed": 11 + i,
            "temperature": 0 if i % 2 else 0.8}
    async with httpx.AsyncClient(timeout=600) as c:
        r = await c.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        r.raise_for_status()
        return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_alone_equals_beside_others(tmp_path, mode):
    port = free_port()
    proc = NodeProcess([*MESH402, "serve", "--port", str(port), "--home", str(tmp_path), "--mode", mode,
                        "--max-batch", "8", "--step-tokens", "32"], tmp_path, env={"MESH402_API_KEY": KEY})
    base = f"http://127.0.0.1:{port}"
    n = 16 if mode == "fast" else 6
    try:
        proc.wait_http(f"{base}/ready", timeout=240)

        async def run():
            alone = [await _complete(base, i, p, n) for i, p in enumerate(PROMPTS)]
            together = await asyncio.gather(*(_complete(base, i, p, n) for i, p in enumerate(PROMPTS)))
            return alone, list(together)

        alone, together = asyncio.run(run())
        assert together == alone
    finally:
        proc.stop()
