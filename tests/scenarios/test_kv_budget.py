"""Memory stays bounded: a hostile client flooding a real node with requests that reserve a lot of KV
(prompt + max_tokens) gets 503 + Retry-After beyond the node's KV budget (`--max-kv-mb`), never an OOM,
while an ordinary request is still served beside the admitted ones."""
from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from harness.procs import MESH402, NodeProcess, free_port

KEY = "kv-key-1"
MODEL = "smollm2-135m-instruct"
HDRS = {"Authorization": f"Bearer {KEY}"}
# SmolLM2-135M fp32 KV: 30 layers x 2 x 3 heads x 64 x 4 B = 46,080 B per position; a request reserves
# prompt + max_tokens positions (rounded up to a chunk, plus one): 1,900 tokens ~ 90 MB, so a 200 MB budget
# admits two of them and leaves room for small requests (~3 MB each).
BIG = 1900
NO_EOS = {"0": -100, "1": -100, "2": -100}  # the flood's streams must not end on their own


def _big_admitted_after_flood(base: str) -> bool:
    """A big reservation fits again once the flood disconnected (its streams cancelled, their KV freed)."""
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": BIG, "stream": True}
    for _ in range(30):
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=HDRS, timeout=120) as r:
            if r.status_code == 200:
                return True
        time.sleep(1)
    return False


def test_flood_gets_503_others_served(tmp_path):
    port = free_port()
    proc = NodeProcess([*MESH402, "serve", "--port", str(port), "--home", str(tmp_path), "--max-kv-mb", "200",
                        "--max-sessions", "16"], tmp_path, env={"MESH402_API_KEY": KEY})
    base = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(f"{base}/ready", timeout=240)

        async def run():
            async with contextlib.AsyncExitStack() as stack:
                c = await stack.enter_async_context(httpx.AsyncClient(timeout=120))
                admitted, refused = [], []
                for i in range(6):  # the flood: each holds its stream (and its KV reservation) open
                    body = {"model": MODEL, "prompt": f"Count forever {i}:", "max_tokens": BIG, "stream": True,
                            "logit_bias": NO_EOS}
                    r = await stack.enter_async_context(c.stream("POST", f"{base}/v1/completions", json=body,
                                                                 headers=HDRS))
                    if r.status_code == 200:
                        lines = r.aiter_lines()
                        first = ""
                        while not first.startswith("data:"):
                            first = await lines.__anext__()
                        admitted.append((r, lines))  # kept referenced: a collected iterator closes the stream
                    else:
                        await r.aread()
                        refused.append(r)
                small = await c.post(f"{base}/v1/completions", headers=HDRS,
                                     json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8})
                return admitted, refused, small

        admitted, refused, small = asyncio.run(run())
        assert len(admitted) == 2, [r.status_code for r in refused]
        assert len(refused) == 4 and all(r.status_code == 503 for r in refused)
        assert all(r.headers.get("retry-after") for r in refused)
        assert small.status_code == 200 and small.json()["choices"][0]["text"]
        assert proc.proc.poll() is None, "the node died"
        assert _big_admitted_after_flood(base), "the flood's KV reservations were not released"
    finally:
        proc.stop()
